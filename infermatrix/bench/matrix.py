"""The matrix spec: a TOML file whose `[[cases]]` tables each expand to the
cartesian product of their list values.

    [run]
    warmup = 1            # untimed runs per measurement (plus warmup_s seconds)
    min_runs = 5          # timed runs at least; more until the median's 95% CI
    target_ci = 0.02      #   is within 2%, or max_runs / max_time_s is reached
    timeout_s = 600       # per case, when cases run in their own process
    interleave = false    # true: cases differing only in variant take turns, `rounds`
                          #   rounds of `turn_s` seconds each; speedups from paired rounds

    [[cases]]
    model = "smollm2-135m"
    variant = ["reference", "sdpa"]
    workload = "prefill"
    dtype = ["float32", "bfloat16"]
    batch = 1
    prompt_len = [128, 512]
    baseline = "sdpa"     # optional: speedups of these cases are ratios to the same case
                          # with this spec (or {without = "linear"}: the case's own spec
                          # without its linear-axis variant); default: `reference`.
                          # A baseline no table lists is added to the run.

    [[exclude]]           # drop every expanded case matching all these keys
    variant = "reference"
    dtype = "bfloat16"

    [[include]]           # add cases after exclusion (lists expand here too)
    model = "tiny"
    variant = "sdpa"

A scalar is a one-element list. Fields a workload does not use are reset to their
defaults, so they neither multiply cases nor show in the case id. Unknown keys
(with the nearest valid one suggested), workloads, dtypes, variants and
impossible shapes are errors raised before any case runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import re
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch

from infermatrix.bench.shipped import builtin_matrices
from infermatrix.errors import UserError
from infermatrix.reports.record import shape_parts
from infermatrix.variants import canonical_spec, parse_spec, registered_variants
from infermatrix.weights import DTYPES, RANDOM_PRESETS, model_config, model_tokenizer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# workload -> the shape fields it uses (beyond model, variant, dtype, device)
WORKLOADS: dict[str, tuple[str, ...]] = {
    "prefill": ("batch", "prompt_len"),
    "decode": ("batch", "prompt_len", "new_tokens", "task"),
    "generate": ("batch", "prompt_len", "new_tokens", "task"),
    "drift": ("windows", "prompt_len", "new_tokens"),
    "attention": ("batch", "prompt_len", "kv_len", "heads", "kv_heads", "head_dim", "causal"),
    "linear": ("batch", "prompt_len", "in_features", "out_features"),
    "encode": ("batch", "prompt_len"),
    "serve": ("batch", "prompt_len", "new_tokens", "requests", "rate", "concurrency", "duration_s", "lengths",
              "slo_ttft_ms", "slo_itl_ms", "slo_pct", "batching", "token_budget", "kv_blocks"),
}
# the workloads each model kind (ModelConfig.kind, EncoderConfig.kind) runs; op workloads
# take only shapes from the model
MODEL_WORKLOADS: dict[str, tuple[str, ...]] = {
    "decoder": ("prefill", "decode", "generate", "drift", "attention", "linear", "serve"),
    "encoder": ("encode", "drift", "attention", "linear"),
}


@dataclass(frozen=True)
class Case:
    model: str  # a preset, a .gguf file or a checkpoint folder (op workloads take their default shapes from it)
    variant: str  # canonical spec string
    workload: str = "prefill"
    dtype: str = "float32"
    device: str = "cpu"
    batch: int = 1  # encode: sentences
    prompt_len: int = 128  # prompt tokens; attention: sequence length; linear: M = batch * prompt_len; drift: window;
    # encode: the most tokens a sentence keeps
    new_tokens: int = 32  # decode/generate: tokens generated; drift: greedy tokens compared
    windows: int = 4  # drift: eval-text windows of prompt_len tokens
    kv_len: int = 0  # attention: keys the prompt_len queries see, as the last prompt_len of kv_len
    # positions (a decode step against a cache: prompt_len = 1); 0 = prompt_len
    heads: int = 0  # attention: query heads; 0 = the model's
    kv_heads: int = 0  # attention: KV heads; 0 = the model's
    head_dim: int = 0  # attention: head dim; 0 = the model's
    causal: bool = True  # attention
    in_features: int = 0  # linear: K; 0 = the model's dim
    out_features: int = 0  # linear: N; 0 = the model's MLP hidden size
    task: str = "continue"  # decode/generate prompts: "continue" real text, or "edit" (an instruction to fix
    # the typos of a real-text passage: output that copies much of its prompt; needs a tokenizer)
    # serve (a request stream; batch: the most requests running at once, prompt_len and new_tokens
    # the mean prompt and output lengths):
    requests: int = 0  # requests in the stream; 0 = SERVE_DEFAULTS
    rate: float = 0.0  # open loop: Poisson arrivals, requests/s
    concurrency: int = 0  # closed loop (no rate): clients, each sending its next request when one ends
    duration_s: float = 0.0  # no arrivals after this many seconds; 0 = none
    lengths: str = "uniform"  # prompt and output lengths: "uniform" in [mean/2, 3·mean/2], or "fixed"
    slo_ttft_ms: float = 0.0  # the SLO: time to first token (0 = not judged) ...
    slo_itl_ms: float = 0.0  # ... and a request's mean inter-token latency (0 = not judged) ...
    slo_pct: int = 0  # ... met by at least this share of requests (percent); 0 = SERVE_DEFAULTS
    batching: str = "continuous"  # or "static": a batch admitted only when the last one has ended
    token_budget: int = 0  # most tokens one step feeds (decodes first, then prefill chunks); 0 = SERVE_DEFAULTS
    kv_blocks: int = 0  # the paged cache's pool; 0 = room for `batch` requests of the longest length

    @property
    def case_id(self) -> str:
        # the shape part is the reports' shape label with '-' (reports.record.SHAPE_TAGS)
        shape = "-".join(shape_parts(self.to_dict(), WORKLOADS[self.workload]))
        return "/".join([self.model, self.variant, self.workload, self.dtype, self.device, shape])

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RunSettings:
    warmup: int = 1  # untimed runs before each measurement
    warmup_s: float = 0.0  # ... and at least this many seconds of them
    min_runs: int = 5
    max_runs: int = 200
    target_ci: float = 0.02  # stop when the median's 95% CI half-width is within this fraction
    max_time_s: float = 10.0  # time cap per measurement
    l2_flush: bool = False  # CUDA: flush L2 between runs, outside the timed region
    cuda_graph: bool = False  # CUDA: time CUDA-graph replays
    isolate: bool = True  # each case in its own process (crash, OOM and hang isolation; per-case peak RSS)
    interleave: bool = False  # the cases of a group (differing only in variant) take turns (bench/interleave.py)
    rounds: int = 8  # interleave: rounds of turns; speedups are computed from paired rounds
    turn_s: float = 0.5  # interleave: seconds of sampling per turn (at least one sample)
    timeout_s: float = 600.0  # per case, when isolated
    seed: int = 0


@dataclass(frozen=True)
class Shard:
    """Which share of a matrix a run holds (`--shard K/N`; bench.shard splits)."""

    index: int  # K, from 1
    count: int  # N
    matrix_cases: int  # cases of the whole matrix, for checking a merge is complete
    device_dtypes: tuple[tuple[str, str], ...] = ()  # (device type, dtype) of the whole matrix's cases


@dataclass(frozen=True)
class Matrix:
    cases: tuple[Case, ...]
    settings: RunSettings
    source: str
    text: str | None = None  # the TOML, kept in the run folder (its [gate] rules travel with it)
    gate_rules: tuple[str, ...] = ()
    shard: Shard | None = None  # None: the whole matrix
    baselines: dict[str, str] = dataclasses.field(default_factory=dict)  # case_id -> its baseline's case_id


_CASE_FIELDS = {f.name: f for f in fields(Case)}
# a serve case's size fields left 0
SERVE_DEFAULTS = {"requests": 64, "token_budget": 256, "slo_pct": 90}
# the values of the text fields (each a choice), reset to their default where a workload does not use them
TEXT_CHOICES = {"task": ("continue", "edit"), "lengths": ("uniform", "fixed"), "batching": ("continuous", "static")}
_SETTING_FIELDS = {f.name: f for f in fields(RunSettings)}


def _unknown(kind: str, key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown {kind} {key!r}; {hint}valid: {', '.join(valid)}"


def load_matrix(path: str | Path | None = None, overrides: dict | None = None) -> Matrix:
    """A TOML file, or the name of a built-in matrix (`default`, `ci`); None is `default`.
    `overrides` replace [run] settings (from the command line)."""
    builtins = builtin_matrices()
    name = "default" if path is None else str(path)
    if name in builtins and not Path(name).is_file():
        source, text = f"{name}.toml (built in)", builtins[name].read_text(encoding="utf-8")
    else:
        file = Path(name)
        if not file.is_file():
            raise UserError(
                f"matrix file {name!r} does not exist; pass a TOML file or a built-in name: {', '.join(sorted(builtins))}"
            )
        source, text = name, file.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{source}: invalid TOML: {exc}") from None
    return dataclasses.replace(parse_matrix(data, source, overrides), text=text)


def _tables(data: dict, key: str, source: str) -> list[dict]:
    tables = data.get(key, [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise UserError(f"{source}: '{key}' must be an array of tables: write [[{key}]], with double brackets")
    return tables


def parse_matrix(data: dict, source: str = "<matrix>", overrides: dict | None = None) -> Matrix:
    """`overrides` replace [run] settings (from the command line)."""
    top_level = ["run", "cases", "exclude", "include", "gate"]
    for key in data:
        if key not in top_level:
            raise UserError(f"{source}: {_unknown('top-level key', key, top_level)}")
    if not isinstance(data.get("run", {}), dict):
        raise UserError(f"{source}: 'run' must be a table: write [run]")
    settings = _parse_settings({**data.get("run", {}), **(overrides or {})}, source)
    tables = _tables(data, "cases", source)
    if not tables:
        raise UserError(f"{source}: no [[cases]] tables; add at least one with model and variant")
    cases: dict[Case, None] = {}  # ordered set: a case listed twice runs once
    baselines: dict[Case, Case] = {}
    for i, table in enumerate(tables):
        where = f"{source}: [[cases]] #{i + 1}"
        table = dict(table)
        baseline_of = _baseline_rule(table.pop("baseline", None), where)
        expanded = _expand(table, where)
        cases.update(dict.fromkeys(expanded))
        if baseline_of is not None:
            _add_baselines(baselines, {case: baseline_of(case) for case in expanded}, where)
    excluded: dict[Case, str] = {}  # a listed case an exclude dropped -> which exclude
    for i, rule in enumerate(_tables(data, "exclude", source)):
        match = _rule(rule, f"{source}: [[exclude]] #{i + 1}")
        excluded.update({c: f"[[exclude]] #{i + 1}" for c in cases if match(c)})
        cases = {c: None for c in cases if not match(c)}
    for i, table in enumerate(_tables(data, "include", source)):
        cases.update(dict.fromkeys(_expand(table, f"{source}: [[include]] #{i + 1}")))
    baselines = {case: base for case, base in baselines.items() if case in cases}
    for case, base in baselines.items():
        if base not in cases and base in excluded:
            raise UserError(f"{source}: {case.case_id} has the baseline {base.case_id}, which {excluded[base]} "
                            "drops; keep the baseline in the run, or name another baseline")
    unlisted = {base: None for base in baselines.values() if base not in cases}
    cases.update(unlisted)  # a baseline is measured even when no table lists it
    for case in cases:  # after the excludes: a combination excluded is never refused
        spec = parse_spec(case.variant)
        config = model_config(case.model)
        for variant in spec:
            try:
                variant.check_case(case.workload, torch.device(case.device), spec)
                variant.check_shape(case)
                if case.workload not in ("attention", "linear"):  # ops take only shapes from the model
                    variant.check_model(config)
                if hasattr(variant, "check_draft"):
                    _check_draft(variant, case, config)
            except ValueError as exc:
                named = " (a baseline no table lists; change the table's `baseline`)" if case in unlisted else ""
                raise UserError(f"{source}: {case.case_id}{named}: {exc}") from None
    stepped = sorted({c.workload for c in cases if c.workload in ("decode", "generate")})
    if settings.cuda_graph and stepped:
        # those workloads time each step on the host around synchronizes; a graph would be dropped
        raise UserError(f"{source}: [run] cuda_graph = true times CUDA-graph replays of one call, but "
                        f"{' and '.join(stepped)} time each step of a generation with a host timer, where no "
                        f"graph runs; set cuda_graph = false, or put the {' and '.join(stepped)} cases in a "
                        "matrix of their own")
    from infermatrix.reports.gate import parse_gate_table  # here, not at the top: it loads scipy

    return Matrix(tuple(cases), settings, source, gate_rules=parse_gate_table(data.get("gate", {}), source),
                  baselines={case.case_id: base.case_id for case, base in baselines.items()})


def _check_draft(variant, case: Case, config) -> None:
    """A draft-model variant's draft against the case's model: the same vocabulary (sizes,
    and the tokenizers' id-to-token maps when the models have them), enough positions."""
    draft = model_config(variant.model)  # a UserError naming the model when it cannot be found
    same = None
    if variant.model != case.model:
        target_tok, draft_tok = model_tokenizer(case.model), model_tokenizer(variant.model)
        if (target_tok is None) != (draft_tok is None):
            which = "the target" if target_tok is None else "the draft"
            raise ValueError(f"{which} has no tokenizer and the other has one, so their ids cannot be shown to mean "
                             f"the same tokens; use a draft with the target's tokenizer")
        if target_tok is not None:
            same = target_tok.get_vocab(with_added_tokens=True) == draft_tok.get_vocab(with_added_tokens=True)
    positions = case.prompt_len + case.new_tokens
    variant.check_draft(config, draft, same, positions)
    if variant.dtype and variant.dtype not in DTYPES:
        raise ValueError(f"draft dtype {variant.dtype!r} is not one of {', '.join(DTYPES)}")


def _baseline_rule(value, where: str) -> Callable[[Case], Case] | None:
    """A [[cases]] table's `baseline`: a variant spec (`baseline = "sdpa"`), or the case's
    own spec without the variants of some axes (`baseline = {without = "linear"}`, or a
    list of axes; nothing left is `reference`). Returns case -> its baseline case."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            spec = canonical_spec(parse_spec(value))
        except UserError as exc:
            raise UserError(f"{where}: baseline: {exc}") from None
        return lambda case: dataclasses.replace(case, variant=spec)
    if isinstance(value, dict) and set(value) == {"without"}:
        axes = value["without"] if isinstance(value["without"], list) else [value["without"]]
        if not axes:
            raise UserError(f"{where}: baseline: without = [] removes nothing, so each case would be its own "
                            "baseline; name an axis, e.g. {without = \"linear\"}")
        known = sorted({cls.axis for cls in registered_variants().values()})
        for axis in axes:
            if axis not in known:
                raise UserError(f"{where}: baseline: {_unknown('axis', str(axis), known)}")

        def without(case: Case) -> Case:
            kept = [v for v in parse_spec(case.variant) if v.axis not in axes]
            return dataclasses.replace(case, variant=canonical_spec(kept) if kept else "reference")

        return without
    raise UserError(f"{where}: baseline must be a variant spec such as \"sdpa\", or {{without = \"<axis>\"}} "
                    f"(or a list of axes), got {value!r}")


def _add_baselines(baselines: dict[Case, Case], found: dict[Case, Case], where: str) -> None:
    for case, base in found.items():
        if baselines.get(case, base) != base:
            raise UserError(f"{where}: {case.case_id} already has the baseline {baselines[case].variant!r} from an "
                            f"earlier table, and this one gives {base.variant!r}; list the case in one table only")
        _check_shape(base, f"{where}: baseline")
        baselines[case] = base


def _parse_settings(table: dict, source: str) -> RunSettings:
    values = {}
    for key, value in table.items():
        if key not in _SETTING_FIELDS:
            raise UserError(f"{source}: {_unknown('[run] key', key, list(_SETTING_FIELDS))}")
        kind = _SETTING_FIELDS[key].type
        if kind == "bool":
            if not isinstance(value, bool):
                raise UserError(f"{source}: [run] {key} must be true or false, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 \
                or (kind == "int" and not isinstance(value, int)):
            raise UserError(f"{source}: [run] {key} must be a non-negative {kind}, got {value!r}")
        values[key] = value
    settings = RunSettings(**values)
    for key in ("min_runs", "max_runs", "timeout_s", "max_time_s", "target_ci", "rounds", "turn_s"):
        if getattr(settings, key) <= 0:
            raise UserError(f"{source}: [run] {key} must be positive")
    if settings.interleave and not settings.isolate:
        raise UserError(f"{source}: [run] interleave = true runs each case of a group in its own process, taking "
                        "turns; it needs isolate = true (drop --no-isolate, or set interleave = false)")
    if settings.max_runs < settings.min_runs:
        raise UserError(f"{source}: [run] max_runs ({settings.max_runs}) is below min_runs ({settings.min_runs})")
    return settings


def _rule(rule: dict, where: str):
    """A predicate: does a case match every key of this exclude rule (lists: any value)?"""
    for key in rule:
        if key not in _CASE_FIELDS:
            raise UserError(f"{where}: {_unknown('key', key, list(_CASE_FIELDS))}")
    wanted = {key: [_check_value(key, v, where) for v in (vals if isinstance(vals, list) else [vals])]
              for key, vals in rule.items()}
    return lambda case: all(getattr(case, key) in values for key, values in wanted.items())


def _expand(table: dict, where: str) -> list[Case]:
    for key in table:
        if key not in _CASE_FIELDS:
            raise UserError(f"{where}: {_unknown('key', key, list(_CASE_FIELDS))}")
    for required in ("model", "variant"):
        if required not in table:
            raise UserError(f"{where}: missing {required!r}")
    axes = {}
    for name in _CASE_FIELDS:
        value = table.get(name, _CASE_FIELDS[name].default)
        values = value if isinstance(value, list) else [value]
        if not values:
            raise UserError(f"{where}: {name} is an empty list")
        axes[name] = [_check_value(name, v, where) for v in values]
    if "serve" in axes["workload"]:
        _check_serve_table(table, axes, where)
    cases: dict[Case, None] = {}
    for combo in itertools.product(*axes.values()):
        case = _normalize(Case(**dict(zip(axes, combo))))
        _check_shape(case, where)
        cases[case] = None
    return list(cases)


def _check_serve_table(table: dict, axes: dict, where: str) -> None:
    if "rate" in table and any(rate <= 0 for rate in axes["rate"]):
        raise UserError(f"{where}: rate must be above 0 requests/s; for a closed loop leave rate out and set "
                        "concurrency")
    slo = any(axes["slo_ttft_ms"]) or any(axes["slo_itl_ms"])
    if slo and len(set(axes["rate"])) < 2:
        raise UserError(f"{where}: an SLO (slo_ttft_ms, slo_itl_ms) is judged along a rate sweep, to find the "
                        "highest rate that meets it; give rate two or more values, e.g. rate = [0.5, 1, 2, 4]")


def length_range(mean: int, lengths: str) -> tuple[int, int]:
    """The shortest and longest of a serve case's prompt or output lengths around `mean`."""
    return (max(1, mean // 2), mean + mean // 2) if lengths == "uniform" else (mean, mean)


def paged_cache(case: Case):
    """The case's paged_kv_cache variant, or None."""
    return next((v for v in parse_spec(case.variant) if v.name == "paged_kv_cache"), None)


def serve_pool(case: Case) -> tuple[int, int]:
    """(blocks the longest request needs, blocks of the pool) of a case with a paged cache:
    the pool is kv_blocks, or room for `batch` requests of the longest length."""
    block = paged_cache(case).block
    longest = length_range(case.prompt_len, case.lengths)[1] + length_range(case.new_tokens, case.lengths)[1] - 1
    need = -(-longest // block)
    return need, case.kv_blocks or need * case.batch


def _check_serve_case(case: Case, cfg, where: str) -> None:
    if (case.rate > 0) == (case.concurrency > 0):
        raise UserError(f"{where}: serve takes rate (an open loop, requests/s) or concurrency (a closed loop of "
                        "clients), one of them")
    paged = paged_cache(case)
    if paged is None:
        static = next((v.name for v in parse_spec(case.variant) if v.axis == "cache"), None)
        why = (f"{static} is a static cache, one buffer per batch row at its longest length, which a stream of "
               "requests arriving and ending cannot share; " if static else "")
        raise UserError(f"{where}: {case.variant} on serve: {why}serve batches continuously over a paged KV cache; "
                        "use paged_kv_cache (e.g. paged_kv_cache+sdpa)")
    prompt_max, out_max = length_range(case.prompt_len, case.lengths)[1], length_range(case.new_tokens, case.lengths)[1]
    if prompt_max + out_max - 1 > cfg.max_seq_len:  # the last output token is never fed
        raise UserError(f"{where}: the longest request ({prompt_max} prompt + {out_max} output tokens) exceeds "
                        f"{case.model}'s context of {cfg.max_seq_len}; lower prompt_len or new_tokens")
    need, pool = serve_pool(case)
    if pool < need:
        raise UserError(f"{where}: kv_blocks = {pool} blocks of {paged.block} positions cannot hold the longest "
                        f"request ({prompt_max} + {out_max} tokens, {need} blocks); raise kv_blocks to at least "
                        f"{need}, or leave it 0")
    if case.token_budget < case.batch:
        raise UserError(f"{where}: token_budget ({case.token_budget}) is below batch ({case.batch}): every running "
                        "request decodes a token each step; raise token_budget to at least batch")
    if case.new_tokens < 1:
        raise UserError(f"{where}: serve needs new_tokens of at least 1 (the mean answer length)")
    if case.slo_pct > 100:
        raise UserError(f"{where}: slo_pct ({case.slo_pct}) is a share of requests in percent; give 1 to 100")


def _normalize(case: Case) -> Case:
    """Zero the size fields this case's workload does not use (and reset `causal`)."""
    used = WORKLOADS[case.workload]
    if case.workload == "drift" and model_config(case.model).kind == "encoder":
        used = tuple(name for name in used if name != "new_tokens")  # an encoder generates no tokens
    reset = {name: (0 if f.type == "int" else 0.0 if f.type == "float" else f.default)
             for name, f in _CASE_FIELDS.items()
             if name not in used and (f.type in ("int", "float", "bool") or name in TEXT_CHOICES)}
    if case.workload == "serve":
        reset.update({name: value for name, value in SERVE_DEFAULTS.items() if not getattr(case, name)})
        if not (case.slo_ttft_ms or case.slo_itl_ms):
            reset["slo_pct"] = 0  # no SLO: no share of it to meet
    if case.kv_len == case.prompt_len:
        reset["kv_len"] = 0  # as many keys as queries, the default: one case, one id
    return dataclasses.replace(case, **reset)


def _check_shape(case: Case, where: str) -> None:
    cfg = model_config(case.model)
    for variant in parse_spec(case.variant):
        try:
            variant.check_device(torch.device(case.device))
        except ValueError as exc:
            raise UserError(f"{where}: {case.variant} on {case.device}: {exc}") from None
    if case.workload not in MODEL_WORKLOADS[cfg.kind]:
        why = ("an encoder has no next-token step; use encode (or drift)" if cfg.kind == "encoder" else
               "encode runs a bidirectional encoder over padded sentences; for a decoder use prefill")
        raise UserError(f"{where}: {case.model} is {'an' if cfg.kind == 'encoder' else 'a'} {cfg.kind}: "
                        f"the {case.workload} workload does not apply ({why})")
    if case.workload == "encode" and case.prompt_len > cfg.max_seq_len:
        raise UserError(f"{where}: prompt_len {case.prompt_len} exceeds {case.model}'s {cfg.max_seq_len} positions; "
                        "lower prompt_len")
    if case.task == "edit" and model_config(case.model).kind == "decoder" and case.model in RANDOM_PRESETS:
        raise UserError(f"{where}: task = \"edit\" asks the model to fix a real-text passage, which needs its "
                        f"tokenizer, and {case.model} is a random-weight preset without one; use task = "
                        "\"continue\", or a model with a tokenizer")
    if case.workload == "serve":
        _check_serve_case(case, cfg, where)
    if case.workload in ("decode", "generate") and case.new_tokens < 2:
        raise UserError(f"{where}: {case.workload} needs new_tokens >= 2 (one prefill token, then decode steps)")
    if case.workload in ("prefill", "decode", "generate", "drift"):
        extra = case.new_tokens if case.workload != "prefill" else 0  # zero for an encoder's drift
        if case.prompt_len + extra > cfg.max_seq_len:
            raise UserError(
                f"{where}: prompt_len {case.prompt_len} + new_tokens {extra} exceeds {case.model}'s context "
                f"of {cfg.max_seq_len} tokens; lower prompt_len or new_tokens"
            )
    if case.workload == "attention":
        if case.heads and not case.head_dim and cfg.dim % case.heads:
            raise UserError(f"{where}: heads ({case.heads}) does not divide {case.model}'s dim ({cfg.dim}); "
                            "give head_dim too, or a head count that divides it")
        heads, kv_heads, head_dim = attention_shape(case)
        if heads % kv_heads:
            raise UserError(f"{where}: heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        if head_dim % 2:
            raise UserError(f"{where}: head_dim must be even, got {head_dim}")
        if case.kv_len and case.kv_len < case.prompt_len:
            raise UserError(f"{where}: kv_len ({case.kv_len}) is below prompt_len ({case.prompt_len}): the "
                            "queries are the last prompt_len of kv_len positions; raise kv_len, or leave it 0 "
                            "for as many keys as queries")


def device_dtypes(cases) -> tuple[tuple[str, str], ...]:
    """The sorted (device type, dtype) pairs of `cases`: what the machine peaks are measured for."""
    return tuple(sorted({(c.device.split(":")[0], c.dtype) for c in cases}))


def attention_keys(case: Case) -> int:
    """The keys of an attention case: kv_len, or as many as its queries."""
    return case.kv_len or case.prompt_len


def attention_shape(case: Case) -> tuple[int, int, int]:
    """(heads, kv_heads, head_dim) of an attention case; unset fields come from the
    model: its shape, or with only `heads` given, dim / heads and no grouping."""
    cfg = model_config(case.model)
    if not case.heads:
        return cfg.n_heads, case.kv_heads or cfg.n_kv_heads, case.head_dim or cfg.head_dim
    return case.heads, case.kv_heads or case.heads, case.head_dim or cfg.dim // case.heads


def linear_shape(case: Case) -> tuple[int, int, int]:
    """(M, K, N) of a linear case: M = batch * prompt_len tokens; K, N default to the
    model's dim and MLP hidden size."""
    cfg = model_config(case.model)
    return case.batch * case.prompt_len, case.in_features or cfg.dim, case.out_features or cfg.hidden_dim


def _check_value(name: str, value, where: str):
    kind = _CASE_FIELDS[name].type
    if kind == "bool":
        if not isinstance(value, bool):
            raise UserError(f"{where}: {name} must be true or false, got {value!r}")
        return value
    if kind == "float":
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise UserError(f"{where}: {name} must be a number >= 0, got {value!r}")
        return float(value)
    if kind == "int":
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UserError(f"{where}: {name} must be a positive integer, got {value!r}")
        if value == 0 and name in ("batch", "prompt_len", "windows"):
            raise UserError(f"{where}: {name} must be a positive integer, got 0")
        return value
    if not isinstance(value, str):
        raise UserError(f"{where}: {name} must be a string, got {value!r}")
    if name == "workload" and value not in WORKLOADS:
        raise UserError(f"{where}: {_unknown('workload', value, list(WORKLOADS))}")
    if name == "dtype" and value not in DTYPES:
        raise UserError(f"{where}: {_unknown('dtype', value, list(DTYPES))}")
    if name == "model":
        try:
            model_config(value)  # checks presets, files and folders without loading weights
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
    if name in TEXT_CHOICES and value not in TEXT_CHOICES[name]:
        raise UserError(f"{where}: {_unknown(name, value, list(TEXT_CHOICES[name]))}")
    if name == "device" and not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise UserError(f"{where}: unknown device {value!r}; valid: cpu, cuda, cuda:N")
    if name == "variant":
        return canonical_spec(parse_spec(value))  # raises a UserError naming the bad part
    return value
