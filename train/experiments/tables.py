"""The experiment tables, read from YAML: rows (a student network and a method's training settings), labels.

A table file (configs/experiments/NAME.yaml, or any path) holds:

    title: what the table compares
    student: mobile_unet          # optional: every row's student network; absent = the configuration's own
    teacher: true                 # optional: show the shared teacher's own scores first
    grid: [0.1, 1.0, 10.0]        # optional: the --tune grid of this table (default GRID)
    rows:                         # each: a method of methods.yaml, with optional id, label, student, settings
      - {method: alone}
      - {method: coco, label: CoCo DistillNet + AdvD}
      - {method: alone, id: alone_semi60, label: "student alone, 60% labelled", settings: {labelled_fraction: 0.6}}
    methods: [alone, kd]          # or: these methods at each labelled fraction (ids METHOD_semiPERCENT)
    fractions: [0.1, 0.2]

A row id names one training run per seed (the folder WORK/STUDENT/ID/seedS): the same (student, id) must mean
the same settings in every table, so rows shared by several tables are trained once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from cocofast.losses import LOSSES, parse_losses
from cocofast.train.config import ConfigError

TEACHER = "teacher"  # pseudo-row: the shared teacher's own scores
TEACHER_SEEDS = "teacher seeds"  # pseudo-row: the teacher retrained at each of --teacher_seeds
OWN_STUDENT = "student"  # run folder of rows that train the configuration's own student network
TABLE_KEYS = {"title", "student", "teacher", "teacher_seeds", "grid", "rows", "methods", "fractions"}
ROW_KEYS = {"method", "id", "label", "student", "settings"}


def configs_folder() -> Path:
    """The configurations this package ships: cocofast.configs once installed, configs/ of a source checkout
    (an editable install maps only cocofast, cocofast.kernels and cocofast.train)."""
    try:
        return Path(str(resources.files("cocofast.configs")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "configs"


def tables_folder() -> Path:
    return configs_folder() / "experiments"


def default_config() -> Path:
    return configs_folder() / "experiments.yaml"


@dataclass(frozen=True)
class Row:
    id: str                     # run folder name; one id = one set of settings
    label: str                  # what the table calls it
    student: str = ""           # student network; "" = the configuration's student_model
    settings: tuple[tuple[str, str], ...] = field(default=())

    def args(self) -> list[str]:
        """The training program's arguments: the student network where the row names one, and its settings."""
        return ([f"--student_model={self.student}"] if self.student else []) + self.setting_args()

    def setting_args(self) -> list[str]:
        return [f"--{k}={v}" for k, v in self.settings]

    @property
    def network(self) -> str:
        """The row's folder under --work, and what the tables print as its network."""
        return self.student or OWN_STUDENT


def make_row(id: str, label: str, student: str = "", **settings) -> Row:
    return Row(id, label, student, tuple(sorted((k, _text(v)) for k, v in settings.items())))


def _text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    rows: list                  # Row, TEACHER or TEACHER_SEEDS
    grid: tuple[float, ...] | None = None
    source: str = ""            # the file it was read from


class TableError(ConfigError):
    """A table file or a --methods list that cannot be read; the message names the file and the key."""


def load_methods(path: Path | None = None) -> dict[str, tuple[str, dict]]:
    """methods.yaml: method name -> (label, settings)."""
    path = tables_folder() / "methods.yaml" if path is None else path
    data = _read(path)
    methods = {}
    for name, entry in data.items():
        if not isinstance(entry, dict) or set(entry) - {"label", "settings"} or "settings" not in entry:
            raise TableError(f"{path}: method {name!r}: expected {{label: ..., settings: {{key: value}}}}")
        methods[str(name)] = (str(entry.get("label", name)), dict(entry["settings"]))
    return methods


def _read(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise TableError(f"table file {path}: cannot read it ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise TableError(f"table file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise TableError(f"table file {path}: expected a mapping of key: value")
    return data


def _method(methods: dict, name: str, where: str) -> tuple[str, dict]:
    if name not in methods:
        raise TableError(f"{where}: unknown method {name!r}; known: {', '.join(methods)}")
    return methods[name]


def fraction_rows(method_names, fractions, student: str, methods: dict, where: str) -> list[Row]:
    rows = []
    for fraction in fractions:
        percent = round(100 * float(fraction))
        for name in method_names:
            label, settings = _method(methods, name, where)
            rows.append(make_row(f"{name}_semi{percent}", f"{label}, {percent} % labelled", student,
                                 labelled_fraction=fraction, **settings))
    return rows


def load_table(path: Path, methods: dict | None = None) -> Table:
    path = Path(path)
    methods = load_methods() if methods is None else methods
    data = _read(path)
    unknown = set(data) - TABLE_KEYS
    if unknown:
        raise TableError(f"table file {path}: unknown key(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(sorted(TABLE_KEYS))}")
    if "title" not in data:
        raise TableError(f"table file {path}: needs a title")
    if data.get("teacher_seeds"):
        return Table(path.stem, str(data["title"]), [TEACHER_SEEDS], source=str(path))
    student = str(data.get("student", ""))
    rows: list = [TEACHER] if data.get("teacher") else []
    for i, entry in enumerate(data.get("rows") or []):
        where = f"table file {path}, row {i + 1}"
        if not isinstance(entry, dict) or "method" not in entry or set(entry) - ROW_KEYS:
            raise TableError(f"{where}: expected {{method: NAME}} with optional {', '.join(sorted(ROW_KEYS - {'method'}))}")
        label, settings = _method(methods, entry["method"], where)
        rows.append(make_row(str(entry.get("id", entry["method"])), str(entry.get("label", label)),
                             str(entry.get("student", student)), **{**settings, **(entry.get("settings") or {})}))
    if "methods" in data or "fractions" in data:
        rows += fraction_rows(data.get("methods") or [], data.get("fractions") or [], student, methods,
                              f"table file {path}")
    if not [r for r in rows if isinstance(r, Row)]:
        raise TableError(f"table file {path}: no rows (give rows:, or methods: with fractions:)")
    grid = data.get("grid")
    return Table(path.stem, str(data["title"]), rows, parse_grid(grid, f"table file {path}: grid") if grid else None,
                 str(path))


def parse_grid(values, where: str) -> tuple[float, ...]:
    """Positive factors on each searched default, in increasing order, 1 among them (the default itself)."""
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    try:
        grid = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise TableError(f"{where}: expected comma-separated numbers, got {values!r}") from None
    if not grid or any(not g > 0 for g in grid) or 1.0 not in grid or list(grid) != sorted(set(grid)):
        raise TableError(f"{where}: expected distinct increasing positive factors including 1 (the default), "
                         f"got {values!r}")
    return grid


def packaged_tables() -> dict[str, Table]:
    """Every table shipped in configs/experiments/ (methods.yaml is the vocabulary, not a table)."""
    methods = load_methods()
    tables = {p.stem: load_table(p, methods) for p in sorted(tables_folder().glob("*.yaml")) if p.stem != "methods"}
    check_ids_are_consistent(tables.values())
    return dict(sorted(tables.items(), key=lambda kv: PAPER_ORDER.index(kv[0]) if kv[0] in PAPER_ORDER else 99))


PAPER_ORDER = ["I", "II", "III", "emkd", "graph_flow", "cpkd", "drift", "teacher", "scarce", "scarce10", "scarce20"]


def methods_table(names: list[str], student: str = "") -> Table:
    """An ad-hoc table from method names: each method a row, paired with the student alone (added first)."""
    methods = load_methods()
    names = list(dict.fromkeys(["alone", *names]))
    rows = []
    for name in names:
        label, settings = _method(methods, name, "--methods")
        rows.append(make_row(name, label, student, **settings))
    return Table("methods", f"{', '.join(n for n in names if n != 'alone')} against the student alone", rows)


def check_ids_are_consistent(tables) -> None:
    """The same (student, id) must mean the same settings in every table: it names one shared run."""
    seen: dict[tuple[str, str], Row] = {}
    for table in tables:
        for row in table.rows:
            if not isinstance(row, Row):
                continue
            other = seen.setdefault((row.student, row.id), row)
            if other.settings != row.settings:
                raise TableError(f"row id {row.id!r} ({row.network}) has two different settings: "
                                 f"{other.setting_args()} and {row.setting_args()} ({table.source})")


def losses_of(row: Row):
    return parse_losses(dict(row.settings).get("losses", "none"))


def is_alone(row: Row) -> bool:
    return not losses_of(row) and dict(row.settings).get("adversarial", "true") == "false"


def reads_paraphrased(row: Row) -> bool:
    """Whether the row's student stage reads paraphraser encodings: a loss defined on them, and the switch on."""
    if dict(row.settings).get("use_paraphraser", "true") == "false":
        return False
    return any(LOSSES[spec.name].reads.teacher == "paraphrased" for spec in losses_of(row))


def reference_of(rows: list, row: Row) -> Row | None:
    """The student-alone row a row is paired with: same network and labelled fraction, the same supervised
    loss where the table has one (EMKD's focal + dice), else cross-entropy. None for the plain baseline."""
    if not isinstance(row, Row):
        return None
    fraction = lambda r: float(dict(r.settings).get("labelled_fraction", 1.0))
    supervised = lambda r: dict(r.settings).get("supervised_loss", "ce")
    if is_alone(row) and supervised(row) == "ce":
        return None
    alone = [r for r in rows if isinstance(r, Row) and r != row and is_alone(r) and r.student == row.student
             and fraction(r) == fraction(row)]
    same = [r for r in alone if supervised(r) == supervised(row)] or [r for r in alone if supervised(r) == "ce"]
    return same[0] if same else None
