"""The matrix spec: a TOML file whose `[[cases]]` tables each expand to the
cartesian product of their list values.

    [run]
    warmup = 1          # untimed runs per case
    repeat = 5          # timed runs per case

    [[cases]]
    model = "smollm2-135m"
    variant = ["reference", "sdpa"]
    workload = "prefill"
    dtype = ["float32", "bfloat16"]
    batch = 1
    prompt_len = [128, 512]

A scalar is a one-element list. Unknown keys, workloads, dtypes and variants are
errors that name the field and what is valid.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import sys
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path

from infermatrix.bench.workloads import WORKLOAD_FNS
from infermatrix.errors import UserError
from infermatrix.variants import canonical_spec, parse_spec
from infermatrix.weights import DTYPES, model_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

WORKLOADS = tuple(WORKLOAD_FNS)


@dataclass(frozen=True)
class Case:
    model: str
    variant: str  # canonical spec string
    workload: str = "prefill"
    dtype: str = "float32"
    device: str = "cpu"
    batch: int = 1
    prompt_len: int = 128
    new_tokens: int = 32  # decode only; 0 for other workloads

    @property
    def case_id(self) -> str:
        shape = f"b{self.batch}-p{self.prompt_len}" + (f"-n{self.new_tokens}" if self.workload == "decode" else "")
        return "/".join([self.model, self.variant, self.workload, self.dtype, self.device, shape])

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RunSettings:
    warmup: int = 1
    repeat: int = 5


@dataclass(frozen=True)
class Matrix:
    cases: tuple[Case, ...]
    settings: RunSettings
    source: str


_CASE_FIELDS = {f.name: f for f in fields(Case)}


def builtin_matrices() -> dict[str, object]:
    """The matrix files shipped in the package, by name without `.toml`."""
    folder = resources.files("infermatrix") / "benchmarks"
    return {f.name.removesuffix(".toml"): f for f in folder.iterdir() if f.name.endswith(".toml")}


def load_matrix(path: str | Path | None = None) -> Matrix:
    """A TOML file, or the name of a built-in matrix (`default`, `ci`); None is `default`."""
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
    return parse_matrix(data, source)


def parse_matrix(data: dict, source: str = "<matrix>") -> Matrix:
    unknown = set(data) - {"run", "cases"}
    if unknown:
        raise UserError(f"{source}: unknown top-level key(s) {sorted(unknown)}; valid: [run], [[cases]]")
    if not isinstance(data.get("run", {}), dict):
        raise UserError(f"{source}: 'run' must be a table: write [run]")
    settings = _parse_settings(data.get("run", {}), source)
    tables = data.get("cases")
    if not tables:
        raise UserError(f"{source}: no [[cases]] tables; add at least one with model and variant")
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise UserError(f"{source}: 'cases' must be an array of tables: write [[cases]], with double brackets")
    cases: dict[Case, None] = {}  # ordered set: a case listed twice runs once
    for i, table in enumerate(tables):
        cases.update(dict.fromkeys(_expand(table, f"{source}: [[cases]] #{i + 1}")))
    return Matrix(tuple(cases), settings, source)


def _parse_settings(table: dict, source: str) -> RunSettings:
    valid = {f.name for f in fields(RunSettings)}
    for key, value in table.items():
        if key not in valid:
            raise UserError(f"{source}: unknown [run] key {key!r}; valid: {', '.join(sorted(valid))}")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UserError(f"{source}: [run] {key} must be a non-negative integer, got {value!r}")
    settings = RunSettings(**table)
    if settings.repeat < 1:
        raise UserError(f"{source}: [run] repeat must be at least 1")
    return settings


def _expand(table: dict, where: str) -> list[Case]:
    for key in table:
        if key not in _CASE_FIELDS:
            raise UserError(f"{where}: unknown key {key!r}; valid: {', '.join(_CASE_FIELDS)}")
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
    cases = []
    for combo in itertools.product(*axes.values()):
        case = Case(**dict(zip(axes, combo)))
        if case.workload != "decode":  # new_tokens means nothing to prefill: one case, not several
            case = dataclasses.replace(case, new_tokens=0)
        cases.append(case)
    for case in cases:
        if case.workload == "decode" and case.new_tokens < 2:
            raise UserError(f"{where}: decode needs new_tokens >= 2 (one prefill token, then decode steps)")
    return cases


def _check_value(name: str, value, where: str):
    kind = _CASE_FIELDS[name].type
    if kind == "int":
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "new_tokens" else 1):
            raise UserError(f"{where}: {name} must be a positive integer, got {value!r}")
        return value
    if not isinstance(value, str):
        raise UserError(f"{where}: {name} must be a string, got {value!r}")
    if name == "workload" and value not in WORKLOADS:
        raise UserError(f"{where}: unknown workload {value!r}; valid: {', '.join(WORKLOADS)}")
    if name == "dtype" and value not in DTYPES:
        raise UserError(f"{where}: unknown dtype {value!r}; valid: {', '.join(DTYPES)}")
    if name == "model":
        try:
            model_config(value)  # checks presets, files and folders without loading weights
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
    if name == "device" and not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise UserError(f"{where}: unknown device {value!r}; valid: cpu, cuda, cuda:N")
    if name == "variant":
        return canonical_spec(parse_spec(value))  # raises a UserError naming the bad part
    return value
