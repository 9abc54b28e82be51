"""The bench's experiments: one TOML file per preset in ``conf/`` (as Flower's baselines keep theirs), read
into ``Preset`` objects. A preset file holds the grid's axes, the run-config keys every cell shares
(``[base]``) and one ``[[setups]]`` table per model/dataset pair (its own run-config keys in ``overrides``).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources

from fedsq_app.config import DEFENCE_KEYS
from fedsq_app.runtime.metrics import LAST_K

DEFENCE_MODES = ("defaults", "off")


@dataclass(frozen=True)
class Setup:
    """One model/dataset pair and the run-config keys that go with it."""

    model: str
    dataset: str = "embedded"
    overrides: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.model}-{self.dataset.replace('/', '_').replace(':', '_')}"


@dataclass(frozen=True)
class Preset:
    setups: tuple[Setup, ...]
    strategies: tuple[str, ...] = ("fedsq", "fedavg", "fedprox", "fedadam")
    partitions: tuple[str, ...] = ("iid", "0.1", "0.5")  # "iid" or a Dirichlet α
    epochs: tuple[int, ...] = (1, 5)
    seeds: tuple[int, ...] = (0, 1, 2)
    num_clients: int = 10
    base: dict = field(default_factory=dict)  # run-config keys shared by every cell
    # run-config keys of one strategy's cells, e.g. {"fedadam": {"server-lr": 0.01}}: a per-strategy tuned value
    strategy_overrides: dict = field(default_factory=dict)
    mu_grid: tuple[float, ...] = (0.001, 0.01, 0.1)
    tune_on: tuple[tuple[str, int], ...] = ()  # (partition, epochs) combos to tune μ on; () = every combo
    tune_seed: int | None = None  # the seed μ is tuned on; None: the first of ``seeds``
    last_k: int = LAST_K
    num_cpus: int = 2
    cpus_per_client: int = 1
    gpus_per_client: float = 0.0
    engine: str = "inprocess"  # inprocess: the apps in this process (harness.inprocess); ray: Flower's engine
    defences: str = "defaults"  # the server's: defaults (what a user gets) | off (a plain weighted mean)

    @property
    def tuning_seed(self) -> int:
        return self.seeds[0] if self.tune_seed is None else self.tune_seed


def parse_preset(text: str, name: str = "preset") -> Preset:
    """A preset from its TOML text; an unknown key is an error naming it."""
    table = tomllib.loads(text)
    known = {f.name.replace("_", "-"): f.name for f in fields(Preset)}
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ValueError(f"bench preset '{name}': unknown keys {unknown}; known: {sorted(known)}")
    values = {}
    for key, value in table.items():
        if key == "setups":
            value = tuple(Setup(s["model"], s.get("dataset", "embedded"), dict(s.get("overrides", {})))
                          for s in value)
        elif key == "tune-on":
            value = tuple((str(partition), int(epochs)) for partition, epochs in value)
        elif isinstance(value, list):
            value = tuple(value)
        values[known[key]] = value
    if values.get("defences", "defaults") not in DEFENCE_MODES:
        raise ValueError(f"bench preset '{name}': defences = '{values['defences']}'; choose one of "
                         f"{', '.join(DEFENCE_MODES)}")
    own = sorted(set(values.get("base", {})) & set(DEFENCE_KEYS))
    if own:  # one switch says which defences a grid ran, and its tables name it
        raise ValueError(f"bench preset '{name}': [base] sets {own}; say defences = 'off' or 'defaults' instead")
    return Preset(**values)


def load_presets() -> dict[str, Preset]:
    """Every ``conf/<name>.toml`` shipped with the package, by name."""
    conf = resources.files(__package__) / "conf"
    return {entry.name.removesuffix(".toml"): parse_preset(entry.read_text(), entry.name)
            for entry in sorted(conf.iterdir(), key=lambda e: e.name) if entry.name.endswith(".toml")}


PRESETS = load_presets()
