"""The ground of slkit: what every other package stands on, and which stands on nothing of slkit above it.

    params    the typed params of a run (one YAML recipe -> Params), their defaults and the method's values
    schema    one record type per file a run writes
    records   jsonl records written incrementally and atomically, read back as their type
    layout    where each iteration, stage, adapter and lock lives in runs/<run>/
    registry  the loop's stages: notebook, module, files read and written, params sections
    logs      the run's log, runs/<run>/slkit.log
    runlock   one run directory, one run
    builtins  the names behind `builtin:` in a recipe
    exemplars the writing requests slkit ships

The packages above, lowest first: models, engines, method, training, evaluation, then stages and lessons
side by side, and the entry points (slkit.running) on top. Imports only point down; pyproject.toml's
[tool.importlinter] contract states the layers and tests/test_architecture.py checks it.
"""
