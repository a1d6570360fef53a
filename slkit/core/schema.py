"""The schema of every file the stages write: one record type per file, and the registry file name -> type.

    python -m slkit.core.schema      # the README's table of the files a run writes

A `.jsonl` file holds one record of its type per line; a `.json` file one document of its type. Writers
build records through these types (`DraftRecord(...)`), so a misspelt or missing field fails where the
record is written; writing to a registered file checks what is written against its type
(slkit.core.records), and readers name the type they expect (`read_records(path, DraftRecord)`), so
a record lacking a field fails naming file:line:field. Every field has a one-line description.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator


class Record(BaseModel):
    """One record of a file the stages write. Unknown fields are errors: a misspelt field must not pass."""
    model_config = ConfigDict(extra="forbid")


def describe_errors(err: ValidationError) -> str:
    """A validation error as 'field: what is wrong' parts (nested fields dotted), for messages that name a file."""
    parts = []
    for e in err.errors():
        field = ".".join(str(part) for part in e["loc"]) or "(record)"
        parts.append(f"{field}: {e['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


# jsonl records, in the order the loop writes them


class QueryRecord(Record):
    id: str = Field(description="it<k>-q<slot> in macro-iteration k; collect-q<slot> in the final stage's collection")
    query: str = Field(description="the writing request self-instruct wrote")
    language: str = Field(description="the language the query is written in (en, zh), detected from its text")
    words: int = Field(description="words of the query (textstats.count_words)")
    tries: int = Field(description="candidates its slot drew until this one was kept")
    # How it was made, for the lessons (slkit.lessons.queries); empty in queries written by hand.
    exemplars: list[str] = Field([], description="the examples its self-instruct prompt showed")
    completion: str = Field("", description="what the model wrote for that prompt, before parsing")
    judge_answer: str | None = Field(None, description="the judge's reply on the query; None with queries.judge off")


class DraftRecord(Record):
    id: str = Field(description="<query id>-d<sample>")
    query_id: str = Field(description="the id of the query it answers")
    query: str = Field(description="the query's text")
    language: str = Field(description="the query's language")
    sample: int = Field(description="which of drafts.samples_per_query answers of the query, from 0")
    draft: str = Field(description="the Generator's answer, which passed the quality check")
    words: int = Field(description="words of the draft")
    tries: int = Field(description="generations until it passed the quality check")


class ExtensionRecord(Record):
    id: str = Field(description="<draft id>-x<sample>: the extension job's id")
    draft_id: str = Field(description="the id of the draft it lengthens")
    sample: int = Field(description="which of extensions.samples_per_draft jobs of the draft, from 0")
    query_id: str = Field(description="the id of the draft's query")
    query: str = Field(description="the query's text")
    language: str = Field(description="the query's language")
    draft: str = Field(description="the draft it started from")
    draft_words: int = Field(description="words of the draft")
    extended: str = Field(description="the longest text the job's micro-iterations accepted")
    words: int = Field(description="words of the extended text")
    ratio: float = Field(description="words / draft_words, to 3 decimals (kept when > extensions.min_ratio)")
    tries: int = Field(description="tries until one met the length rule (at most extensions.max_tries)")
    micro_iterations_accepted: int = Field(description="micro-iterations of the kept try whose text was accepted")
    micro_iterations: list[dict[str, Any]] = Field(
        default_factory=list, description="one entry per micro-iteration of every try of the job, in order "
                                          "(slkit.method.extensions.micro_iteration_trace)")

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        """A record written before the renames (one word per concept) is read under today's names."""
        if not isinstance(data, dict) or not OLD_EXTENSION_FIELDS.keys() & data.keys():
            return data
        data = {OLD_EXTENSION_FIELDS.get(k, k): v for k, v in data.items()}
        data["micro_iterations"] = [{OLD_TRACE_FIELDS.get(k, k): v for k, v in e.items()} if isinstance(e, dict)
                                    else e for e in data.get("micro_iterations", [])]
        return data


# ExtensionRecord's fields and those of its micro-iteration entries under their names before the renames.
OLD_EXTENSION_FIELDS = {"attempts": "tries", "rounds_accepted": "micro_iterations_accepted",
                        "rounds": "micro_iterations"}
OLD_TRACE_FIELDS = {"attempt": "try_index", "round": "micro_iteration", "stage1": "phase1"}


class TrainingExample(Record):
    id: str = Field(description="the id of the extension (or constrained pair) it was built from")
    prompt: str = Field(description="the user message, unrendered: training renders it as generation does")
    completion: str = Field(description="the answer the adapter learns to write")


class BenchmarkOutput(Record):
    index: int = Field(description="the benchmark item's position in the evaluated subset")
    sample: int = Field(description="which of evaluation.samples_per_query answers of the item, from 0")
    query: str = Field(description="the benchmark's query")
    language: str = Field(description="the query's language")
    type: str = Field(description="the item's constraint type (LonGen: about, range, above, below)")
    bin: str = Field(description="the length bin of the required words (<500, 500-2k, 2k-4k, >=4k)")
    required: float = Field(description="the words the item asks for (LonGen: the middle of its interval)")
    interval: list[float] | None = Field(None, description="LonGen's accepted [low, high] words; None: LongBench-Write")
    words: int = Field(description="words by the counter the benchmark scores with (see counter)")
    counter: str = Field(description="that counter: slkit (LonGen) or longwriter (LongBench-Write)")
    words_slkit: int = Field(description="words by slkit's counter (textstats.count_words)")
    words_longwriter: int = Field(description="words by LongWriter's counter (textstats.count_words_longwriter)")
    score: float = Field(description="the benchmark's length score of the output (LonGen 0-1, LongBench-Write 0-100)")
    cut: bool | None = Field(None, description="max_new_tokens stopped the answer (its length is the cap's, not the "
                                               "model's); None: not recorded (written before slkit recorded it)")
    output: str = Field(description="the Generator's answer")


class Judgement(Record):
    index: int = Field(description="the benchmark output's index")
    sample: int = Field(description="the benchmark output's sample")
    scores: dict[str, float] | None = Field(description="1-10 per dimension (judge.DIMENSIONS); None when failed")
    mean: float | None = Field(description="mean of the scores; None when failed")
    tries: int = Field(description="judge calls until a reply parsed (or judge.max_tries)")
    failed: bool = Field(description="no reply held the scores as JSON")
    last_reply: str | None = Field(description="the last reply's first 500 characters when failed, else None")


class StoredConstraint(Record):
    kind: Literal["about", "range", "above", "below"] = Field(description="the constraint's kind")
    low: int | None = Field(description="about: the target; range, above: the lower bound; below: None")
    high: int | None = Field(description="range, below: the upper bound; else None")


class ConstrainedRecord(Record):
    id: str = Field(description="the id of the draft or extension the pair comes from")
    query: str = Field(description="the query rewritten to carry the constraint")
    original_query: str = Field(description="the query before the rewrite")
    language: str = Field(description="the query's language")
    constraint: StoredConstraint = Field(description="the length constraint the response meets")
    fallback: str | None = Field(description="'<drawn>-><kind>' or 'coarse->unit' when the drawn constraint "
                                             "was not true of the response, else None")
    words: int = Field(description="words of the response")
    source: str = Field(description="its file: iter_<k>/drafts, iter_<k>/extensions or length_control/drafts")
    rewrite: Literal["template", "model"] = Field(description="who rewrote the query")
    completion: str = Field(description="the response")


class EngineTiming(Record):
    event: Literal["ready", "closed", "served", "server_start", "server_stop", "sleep", "wake"] = Field(
        description="an in-process engine started (ready) or closed; a stage's engine on the run's server closed "
                    "(served: what the server generated meanwhile); the run's server answered /health "
                    "(server_start), was stopped (server_stop), went to sleep for training or woke after it")
    at: float = Field(description="Unix time of the event")
    pid: int = Field(description="the process the engine ran in (the run's server: its process group)")
    start_s: float | None = Field(None, description="ready, closed, server_start: seconds the engine took to start")
    seconds: float | None = Field(None, description="sleep, wake: seconds the call took")
    url: str | None = Field(None, description="server_start: the server's URL")
    data_parallel_size: int | None = Field(None, description="server_start: copies of the model it serves")
    tensor_parallel_size: int | None = Field(None, description="server_start: GPUs each copy is split over")
    reason: str | None = Field(None, description="sleep: why (the stage that trains); server_stop: why it stopped")
    generate_s: float | None = Field(None, description="closed: seconds spent generating; served: seconds the stage's "
                                                       "engine was open")
    requests: int | None = Field(None, description="closed: requests it answered")
    generated_tokens: int | None = Field(None, description="closed: tokens it generated; served: tokens the server "
                                                           "generated while the stage's engine was open")
    sleep_s: float | None = Field(None, description="closed: seconds sleep mode took (runs before sleep mode was removed)")
    gpu_free_gib: float | None = Field(None, description="closed: GPU memory free after it, GiB")
    gpu_total_gib: float | None = Field(None, description="closed: the GPU's memory, GiB")


# json documents: stage summaries, the done-marker, training and progress records


class AdapterTrainingSummary(Record):
    samples: int = Field(description="training examples in the file")
    trained: bool = Field(description="an adapter was trained (false: too few samples; see reason)")
    init_adapter: str | None = Field(None, description="the adapter training started from; None: a fresh LoRA")
    dropped_no_response_tokens: int = Field(0, description="examples dropped: their prompt filled training.max_length")
    reason: str | None = Field(None, description="why nothing was trained, when trained is false")
    resumed_from: str | None = Field(None, description="the Trainer checkpoint training resumed from, if any")
    steps: int | None = Field(None, description="optimizer steps")
    seconds: float | None = Field(None, description="wall-clock seconds of training")
    tokens: int | None = Field(None, description="tokens trained on (examples x epochs)")
    first_loss: float | None = Field(None, description="loss at the first logged step")
    final_loss: float | None = Field(None, description="loss at the last logged step")
    losses: list[float] = Field(default_factory=list, description="loss of every logged step; empty when "
                                                                  "untrained, and in length_control.json")
    step_seconds: list[float] = Field(default_factory=list, description="wall-clock seconds of every optimizer step")
    peak_gpu_gib: float | None = Field(None, description="peak GPU memory allocated, GiB; None on a CPU")
    processes: int | None = Field(None, description="training processes (accelerate launch: more than 1)")


class CappedShare(Record):
    outputs: int = Field(description="generated texts counted")
    cut: int = Field(description="of them, texts that max_new_tokens stopped")
    share: float | None = Field(description="cut / outputs; None when nothing was generated")


class CappedByCap(CappedShare):
    stopped_early: int = Field(0, description="texts ended early because they already broke a rule that only gets "
                                              "worse as they grow (a repeated n-gram); 0 in runs before slkit did")
    by_max_new_tokens: dict[str, CappedShare] = Field(description="the same, per max_new_tokens the stage asked for")


class LengthStability(Record):
    overall_cv: float = Field(description="mean over queries of the CV of each query's words over its samples")
    per_type_cv: dict[str, float] = Field(description="that mean per constraint type")
    queries: int = Field(description="queries with 2 or more samples")
    samples_per_query: int = Field(description="the most samples of a query")
    per_query: dict[int, float] = Field(description="the CV of each query, by index")


class LengthScores(Record):
    benchmark: str = Field(description="the benchmark's file name or hub id")
    format: Literal["longen", "longbench_write"] = Field(description="the benchmark's format")
    max_score: float = Field(description="a perfect score on it (LonGen 1, LongBench-Write 100)")
    overall: float = Field(description="mean length score over every output (NaN when there is none)")
    per_type: dict[str, float] = Field(description="mean length score per constraint type")
    per_length_bin: dict[str, float] = Field(description="mean length score per bin of required words")
    per_language: dict[str, float] = Field(description="mean length score per language")
    n: int = Field(description="outputs scored")
    stability: LengthStability | None = Field(description="length stability; None with one sample per query")
    capped: CappedShare | None = Field(None, description="benchmark outputs that max_new_tokens cut; None: not "
                                                         "recorded (written before slkit recorded it)")


class JudgeSummary(Record):
    per_dimension: dict[str, float] = Field(description="mean score per dimension over the judged outputs")
    overall: float | None = Field(description="mean of the judged outputs' means; None when none was judged")
    judged: int = Field(description="outputs the judge scored")
    failed: int = Field(description="outputs whose replies held no scores")
    failure_rate: float | None = Field(description="failed / (judged + failed); None when nothing was judged")


class QueriesSummary(Record):
    queries: int = Field(description="queries written")
    rejected: dict[str, int] = Field(description="candidates rejected, by reason (gave_up: slots out of tries)")
    pool_size: int = Field(description="examples self-instruct imitated (exemplars, plus earlier queries)")
    capped: CappedByCap | None = Field(None, description="texts max_new_tokens cut in this stage's last process, "
                                                         "per cap; None: not recorded (an older run)")


class DraftsSummary(Record):
    drafts: int = Field(description="drafts written")
    rejected: dict[str, int] = Field(description="generations rejected, by quality-check reason (gave_up: slots "
                                                 "that ran out of tries; dropped: slots still being retried when "
                                                 "finish_share of them had ended)")
    finish_share: float | None = Field(None, description="drafts.finish_share: the share of slots that had to end "
                                                          "before the rest were dropped; None: an older run (1)")
    capped: CappedByCap | None = Field(None, description="texts max_new_tokens cut in this stage's last process, "
                                                         "per cap; None: not recorded (an older run)")


class ExtensionsSummary(Record):
    extensions: int = Field(description="extensions written")
    drafts: int = Field(description="drafts read")
    resampled_drafts: int = Field(description="drafts the length-biased resampling kept")
    jobs: int = Field(description="extension jobs: resampled drafts x extensions.samples_per_draft")
    counts: dict[str, int] = Field(description="micro-iteration and job outcomes (micro_iteration_accepted, "
                                               "micro_iteration_rejected_<why>, "
                                               "accepted, retried, gave_up, dropped: jobs still running when "
                                               "finish_share of them had ended)")
    finish_share: float | None = Field(None, description="extensions.finish_share: the share of jobs that had to end "
                                                          "before the rest were dropped; None: an older run (1)")
    capped: CappedByCap | None = Field(None, description="texts max_new_tokens cut in this stage's last process, "
                                                         "per cap; None: not recorded (an older run)")


def micro_iteration_verdict_counts(counts: dict[str, int]) -> dict[str, int]:
    """The micro-iteration verdicts among an ExtensionsSummary's counts (micro_iteration_<verdict>), by verdict
    ("accepted", "rejected_<why>"); an older run's summary names them round_<verdict>."""
    prefixes = ("micro_iteration_", "round_")
    return {next(k.removeprefix(p) for p in prefixes if k.startswith(p)): n for k, n in counts.items()
            if k.startswith(prefixes)}


class TrainingSummary(Record):
    extensions: int = Field(description="extensions read")
    resampled_extensions: int = Field(description="extensions the length-biased resampling kept")
    generator: AdapterTrainingSummary = Field(description="the Generator adapter's training")
    extender: AdapterTrainingSummary = Field(description="the Extender adapter's training")


class EvaluationSummary(Record):
    iteration: int = Field(description="the macro-iteration evaluated (0: the base model)")
    run: str = Field(description="the run's name")
    length_following: LengthScores | None = Field(None, description="length scores; None without a benchmark")
    judge: JudgeSummary | None = Field(None, description="quality scores; None with the judge off")
    words: dict[str, float] = Field(description="mean words per record of each stage file of the iteration")
    counts: dict[str, int] = Field(description="records of each stage file of the iteration")
    figures: list[str] = Field(description="the figures written into the iteration's directory")


class ModelEvaluation(EvaluationSummary):
    """evaluation.json of `slkit evaluate`, which scores a model outside any run: what was scored instead of an
    iteration of a run."""
    iteration: int | None = Field(None, description="None: no run's iteration")
    run: str | None = Field(None, description="None: no run")
    words: dict[str, float] = Field({}, description="empty: no stage files")
    counts: dict[str, int] = Field({}, description="empty: no stage files")
    model: str = Field(description="the model scored (hub id, directory or builtin)")
    adapter: str | None = Field(description="the LoRA adapter scored on it, if any")
    endpoint: str | None = Field(description="the OpenAI-compatible server that answered, if any")
    judge_model: str | None = Field(description="the judge's model; None with the judge off")
    judge_endpoint: str | None = Field(description="the judge's server, if any")


class CollectionSummary(Record):
    queries: int = Field(description="queries the collection pass wrote")
    drafts: int = Field(description="drafts the collection pass wrote")
    rejected_queries: dict[str, int] = Field(description="query candidates rejected, by reason")
    rejected_drafts: dict[str, int] = Field(description="drafts rejected, by reason")


class ConstrainedCounts(Record):
    """constrained.json: what the final stage's constrain phase made; written last, so a phase that has it is done."""
    pairs: int = Field(description="constrained pairs written")
    sources: dict[str, int] = Field(description="pairs per source file")
    skipped: dict[str, int] = Field(description="pairs left out, by reason (names_length: the query names a length)")
    collection: CollectionSummary | None = Field(description="the collection pass; None when collect_queries is 0")
    kinds: dict[str, int] = Field(description="pairs per constraint kind")
    fallbacks: dict[str, int] = Field(description="pairs per fallback taken")
    rewrites: dict[str, int] = Field(description="pairs per rewriter (template, model)")
    model_rewrites_refused: dict[str, int] = Field(description="model rewrites refused, by reason (number, query)")
    capped: CappedByCap | None = Field(None, description="texts max_new_tokens cut in the phase's last process, per cap; "
                                                         "None: not recorded (an older run)")


class LengthControlSummary(ConstrainedCounts):
    training: AdapterTrainingSummary = Field(description="the final Generator's training (losses left empty)")
    length_before: LengthScores | None = Field(description="length scores of the last iteration's Generator")
    length_after: LengthScores | None = Field(description="length scores of the final Generator")


# The summary type of each stage: its done-marker's summary, and what the stage function returns.
STAGE_SUMMARIES: dict[str, type[Record]] = {
    "queries": QueriesSummary, "drafts": DraftsSummary, "extensions": ExtensionsSummary,
    "training": TrainingSummary, "evaluation": EvaluationSummary, "length_control": LengthControlSummary,
}


class DoneMarker(Record):
    stage: str = Field(description="the stage that finished")
    finished_at: float = Field(description="Unix time it finished")
    iteration: int | None = Field(None, description="the final stage: the macro-iteration it ran after; else None")
    summary: dict[str, Any] = Field(description="the stage's summary, of its type in STAGE_SUMMARIES")

    @field_validator("summary")
    @classmethod
    def _summary_of_its_stage(cls, summary: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        stage = info.data.get("stage")
        if stage not in STAGE_SUMMARIES:
            raise ValueError(f"no summary type for stage {stage!r}; known: {', '.join(STAGE_SUMMARIES)}")
        try:
            return STAGE_SUMMARIES[stage].model_validate(summary).model_dump()
        except ValidationError as err:  # re-raised as this field's error, so the message reads summary.<field>
            raise ValueError(describe_errors(err)) from None


class ProgressState(Record):
    stage: str = Field(description="the running stage (and its part, e.g. 'evaluation (judge)')")
    done: int = Field(description="items finished")
    total: int = Field(description="items the stage has")
    texts: int = Field(0, description="texts the engine finished (a job of several generations advances by each)")
    texts_expected: int = Field(0, description="texts the stage expects to generate (grows with retries)")
    started: float = Field(description="Unix time the stage part started, for rate and ETA")


class AfterIteration(Record):
    iteration: int = Field(description="the last macro-iteration the final stage was built after")


@dataclass(frozen=True)
class RunFile:
    name: str  # the file's name; <stage>.done.json stands for every stage's done-marker
    record: type[Record]
    writers: str  # the stages (or part of slkit) that write it
    holds: str  # what one record (jsonl) or the document (json) is


DONE_MARKER = "<stage>.done.json"

FILES: tuple[RunFile, ...] = (
    RunFile("queries.jsonl", QueryRecord, "queries, length_control (collection)", "a kept query"),
    RunFile("drafts.jsonl", DraftRecord, "drafts, length_control (collection)",
            "a draft that passed the quality check"),
    RunFile("resampled_drafts.jsonl", DraftRecord, "extensions", "a draft the length-biased resampling kept"),
    RunFile("extensions.jsonl", ExtensionRecord, "extensions", "an extension job whose text met the length rule"),
    RunFile("resampled_extensions.jsonl", ExtensionRecord, "training", "an extension the resampling kept"),
    RunFile("generator_sft.jsonl", TrainingExample, "training, length_control", "a Generator training example"),
    RunFile("extender_sft.jsonl", TrainingExample, "training", "an Extender training example"),
    RunFile("slkit-train.json", AdapterTrainingSummary, "training, length_control", "an adapter's training"),
    RunFile("benchmark_outputs.jsonl", BenchmarkOutput, "evaluation, length_control", "a scored benchmark answer"),
    RunFile("judgements.jsonl", Judgement, "evaluation", "the judge's scores of a benchmark answer"),
    RunFile("evaluation.json", EvaluationSummary, "evaluation", "the iteration's scores"),
    RunFile("constrained.jsonl", ConstrainedRecord, "length_control", "a pair with a length constraint it meets"),
    RunFile("constrained.json", ConstrainedCounts, "length_control", "the counts of the constrain phase, written when it ends"),
    RunFile("length_control.json", LengthControlSummary, "length_control", "the final stage's summary and scores"),
    RunFile("after_iteration.json", AfterIteration, "length_control", "the iteration the final stage was built after"),
    RunFile(DONE_MARKER, DoneMarker, "every stage, last", "the stage finished, with its summary"),
    RunFile("progress.json", ProgressState, "every stage", "items done of the running stage"),
    RunFile("engine_timings.jsonl", EngineTiming, "the vLLM engine and the run's server",
            "an engine's start or close, the run server's start, stop, sleep and wake, timed"),
)

BY_NAME: dict[str, RunFile] = {f.name: f for f in FILES}


def run_file(path: str | Path) -> RunFile | None:
    """The registry's entry for a file of a run directory (by its name), or None for a file not in it."""
    name = Path(path).name
    return BY_NAME[DONE_MARKER] if name.endswith(".done.json") else BY_NAME.get(name)


def record_type(path: str | Path) -> type[Record]:
    """The record type of a file the stages write (by its name); ValueError for a file the registry lacks."""
    entry = run_file(path)
    if entry is None:
        raise ValueError(f"{path}: not a file the stages write (slkit.core.schema.FILES)")
    return entry.record


def file_table() -> str:
    """The README's table of the files a run writes (tests/test_schema.py keeps the README in step)."""
    rows = ["| file | written by | holds (one jsonl line, or the json document) | type | fields |",
            "|---|---|---|---|---|"]
    for f in FILES:
        rows.append(f"| `{f.name}` | {f.writers} | {f.holds} | `{f.record.__name__}` | "
                    f"{', '.join(f'`{name}`' for name in f.record.model_fields)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(file_table())
