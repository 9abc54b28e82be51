"""The report's model card: the architecture and how it was trained, S's provenance and hash, the data, the
trust settings, intended use and limits, and the whole run config."""

from __future__ import annotations

from typing import Any

from fedsq_app.runtime.report.data import data_section, partitioning
from fedsq_app.runtime.report.markup import code, escape, hash_text, kv_table, num, pct, section, table
from fedsq_app.runtime.report.rounds import bounded
from fedsq_app.runtime.strategies import STRATEGIES

# The run-config keys that decide what a reply may do to the global model (docs/RELIABILITY.md).
TRUST_KEYS = {
    "deviation-bound": "an update's largest distance from the round's median update, as a multiple of the round's "
                       "median such distance (wider for a larger silo; 0 = off)",
    "influence-bound": "a silo's largest pull on the mean, as a fraction of the round's median update norm (0 = off)",
    "clip-multiplier": "two-silo rounds: updates clipped to this multiple of the median norm (0 = off)",
    "bn-clamp": "each reply's BN statistics clamped into the other replies' range (from 3 replies)",
    "direction-check": "τ > 0: a reply whose update's cosine with the round's median update is below −τ, or that "
                       "the bound scaled, is judged by reply-judge (0 = off)",
    "reply-judge": "validation: such a reply is rejected when the round's aggregate has a lower loss on the server's "
                   "validation split without it; repeat: a reply against the median when the node's previous was too",
    "min-valid-replies": "fewer valid replies: the round keeps the previous model",
    "aggregation": "how accepted updates are combined",
    "trim-fraction": "trimmed-mean: share of the largest and of the smallest values dropped",
    "silo-sizes": "deployment: the silos' weights by registered key ('' = partition sizes or equal)",
}
CONFIG_PAIRS_PER_ROW = 3  # ~70 keys: three key/value pairs a row keeps the table one screen high


def model_card(results: dict, config: dict, rounds: list[dict], data: dict, input_spec: Any) -> str:
    strategy = config.get("strategy")
    hashes = []
    for record in rounds:  # fedsq-warmup names a new S after its switch
        sha = record.get("structural_sha256")
        if sha and sha not in hashes:
            hashes.append(sha)
    model = [("architecture", code(config.get("model"))),
             ("trained as", escape(_model_kind(strategy, config))),
             ("strategy", code(strategy)),
             ("classes", num(results.get("num_classes")) + (f" (labels {escape(config['classes'])} of the dataset, "
                                                             "remapped to 0..k-1)" if config.get("classes") else "")),
             ("input", escape(_input_spec(input_spec))),
             ("S pretrained from", code(results.get("pretrained_from"))),
             ("S sha256 (start model)", hash_text(results.get("structural_sha256")))]
    if any(h != results.get("structural_sha256") for h in hashes):
        model.append(("S sha256 named by the rounds", "<br>".join(hash_text(h) for h in hashes)))
    model += [("best round", num(results.get("best_round"))),
              ("best validation accuracy", pct(results.get("best_val_accuracy"))),
              ("test accuracy", f"{pct(results.get('test_accuracy'))} on split "
                                f"{code(config.get('test-split'))} (loss {num(results.get('test_loss'))})"),
              ("weights file", "<code>best_model.safetensors</code>: the best round's travelling weights; "
               "<code>fedsq_app.load_trained(&lt;run dir&gt;)</code> rebuilds the model"
               + (" under S and checks S's hash" if _gated(strategy) else ""))]
    trust = [[code(k), code(_config_value(config[k])), escape(why)] for k, why in TRUST_KEYS.items() if k in config]
    body = ("<h3>Model</h3>\n" + kv_table(model)
            + "<h3>Data</h3>\n" + data_section(results, config, data)
            + "<h3>Trust settings</h3>\n" + table(["key", "value", "what it does"], trust)
            + "<h3>Intended use and limits</h3>\n" + _limits(results, config, rounds, data)
            + "<h3>Run config</h3>\n" + table(["key", "value"] * CONFIG_PAIRS_PER_ROW, _config_rows(config)))
    return section("Model card", body)


def _config_rows(config: dict) -> list[list[str]]:
    """The config's key/value pairs, sorted by key down each column, CONFIG_PAIRS_PER_ROW pairs a row."""
    pairs = [[code(k), code(_config_value(v))] for k, v in sorted(config.items())]
    per_row = CONFIG_PAIRS_PER_ROW
    height = -(-len(pairs) // per_row)
    return [sum((pairs[i + j * height] for j in range(per_row) if i + j * height < len(pairs)), [])
            for i in range(height)]


def _config_value(value: Any) -> str:
    # As the run config (pyproject.toml, --run-config) spells it.
    if isinstance(value, bool):
        return "true" if value else "false"
    return "''" if value == "" else str(value)


def _entry(strategy: str | None):
    """The strategy registry's entry; None for a name this version does not know."""
    return STRATEGIES.get(strategy or "")


def _model_kind(strategy: str | None, config: dict) -> str:
    entry = _entry(strategy)
    if entry is None:
        return f"strategy '{strategy}' (unknown to this version)"
    if entry.switches:
        return (f"plain network (every weight trained and averaged) for {config.get('warmup-rounds')} warm-up "
                "rounds, then a FedSQ DualCopy whose frozen structural copy S is that global model: S decides "
                "which ReLUs fire, the trainable copy Q supplies the values, only Q travels")
    if entry.gated:
        return ("FedSQ DualCopy: a frozen structural copy S (the pretrained start model) decides at every ReLU "
                "which units fire; the trainable copy Q supplies the values; only Q travels and is aggregated")
    return "plain network: every weight is trained locally and aggregated (S is only the start point)"


def _gated(strategy: str | None) -> bool:
    entry = _entry(strategy)
    return entry is not None and (entry.gated or entry.switches)


def _input_spec(spec: Any) -> str:
    if spec is None:
        return "not recorded"
    size = getattr(spec, "size", None)
    mean = ", ".join(f"{m:.3f}" for m in getattr(spec, "mean", ()))
    std = ", ".join(f"{s:.3f}" for s in getattr(spec, "std", ()))
    return (f"{getattr(spec, 'channels', '?')}-channel uint8 images, "
            f"{f'resized to {size}×{size}' if size else 'at the dataset native resolution'}, scaled to [0, 1] "
            f"and normalised with mean ({mean}), std ({std})")


def _limits(results: dict, config: dict, rounds: list[dict], data: dict) -> str:
    dataset, strategy = config.get("dataset"), config.get("strategy")
    total = sum(data["sizes"].values())
    if data["kind"] == "partitions":
        trained = (f"Fine-tuned by federated learning ({strategy}) on {total:,} training images of dataset "
                   f"'{dataset}' (split '{config.get('train-split')}'), split over {len(data['sizes'])} simulated "
                   f"nodes with {partitioning(config)}.")
    else:
        trained = (f"Fine-tuned by federated learning ({strategy}) on the nodes' own data: {total:,} training "
                   f"images as claimed by {len(data.get('nodes') or {})} nodes; the server has seen none of them "
                   f"and cannot confirm their labels or their distribution.")
    items = [trained,
             f"Started from '{results.get('pretrained_from')}' (S sha256 "
             f"{str(results.get('structural_sha256'))[:12]}…); "
             f"{results.get('num_classes')} classes"
             + (f" (labels {config.get('classes')} only)" if config.get("classes") else "") + ".",
             f"Best round chosen by validation ({results.get('validation_source')}); tested once on split "
             f"'{config.get('test-split')}' of '{dataset}': {pct(results.get('test_accuracy'))} "
             f"(chance: {pct(1 / results['num_classes']) if results.get('num_classes') else '—'}).",
             f"Not validated outside that distribution: other datasets, image sources, resolutions or label sets "
             f"need their own evaluation before any use."]
    if not config.get("server-validation", True):
        items.append("The best round was chosen on the nodes' self-reported accuracy, which the server screens "
                     "but cannot verify.")
    if _gated(strategy):
        source = "the warm-up rounds' global model" if _entry(strategy).switches else "the pretrained network"
        items.append(f"FedSQ's gates are fixed by S: which units fire for an input was decided by {source} and "
                     "never trained, so the model only re-weights features S already detects. Q's weights are "
                     "meaningless without that exact S (check its sha256).")
    rejected = sum(r.get("rejected") or 0 for r in rounds)
    scaled = sum(bounded(r) for r in rounds)
    items.append(f"Replies were screened: {rejected} rejected and {scaled} scaled down over {len(rounds)} rounds. "
                 "Screening bounds what one node can do to the model; it cannot tell a mislabelled but "
                 "well-formed update from an honest one.")
    if len(rounds) < 10 or total < 5000:
        items.append(f"A small run ({len(rounds)} rounds, {total:,} training images): a demonstration of the "
                     "pipeline, not a model to deploy.")
    return "<ul>" + "".join(f"<li>{escape(item)}</li>" for item in items) + "</ul>\n"
