"""A finished run's model outside the federation: load_trained, fedsq-predict, fedsq-export."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_RUN, simulate


@pytest.fixture(scope="module")
def finished_run(fedsq_cache, tmp_path_factory) -> Path:
    """A tiny FedSQ run (3 clients, 2 rounds) that left its model behind."""
    out = tmp_path_factory.mktemp("runs")
    simulate({**TINY_RUN, "out-dir": str(out), "run-name": "fedsq"})
    return out / "fedsq"


def results_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_load_trained_is_the_runs_model(finished_run):
    from fedsq_app import DualCopy, load_trained
    from fedsq_app.data.partitions import DataKey, server_split
    from fedsq_app.runtime.train import evaluate

    trained = load_trained(finished_run)
    assert isinstance(trained.model, DualCopy) and not trained.model.training
    assert trained.metadata["structural_sha256"] == results_of(finished_run)["structural_sha256"]
    test = server_split(DataKey.of(trained.config), "test")
    _, accuracy = evaluate(trained.model, test, trained.spec, device=torch.device("cpu"))
    assert accuracy == results_of(finished_run)["test_accuracy"]
    probabilities = trained.predict_proba(test.images[:5])
    assert probabilities.shape == (5, trained.num_classes)
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(5))


def test_predict_matches_the_runs_test_accuracy(finished_run, tmp_path, capsys):
    from fedsq_app.tools.predict import main

    out = tmp_path / "predictions.csv"
    assert main([str(finished_run), "--out", str(out), "--no-progress", "--batch-size", "100"]) == 0
    printed = capsys.readouterr().out
    expected = results_of(finished_run)["test_accuracy"]
    assert f"accuracy: {expected:.4f}" in printed
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2000  # the embedded test split
    assert sum(row["predicted"] == row["label"] for row in rows) / len(rows) == expected
    assert {"id", "predicted", "predicted_name", "label", "class_1", "probability_1", "class_3"} <= set(rows[0])
    from fedsq_app import load_trained

    names = load_trained(finished_run).class_names  # the embedded Fashion-MNIST subset names its classes
    assert len(names) == 10 and "Sneaker" in names
    assert all(row["predicted_name"] == names[int(row["predicted"])] for row in rows)
    assert out.with_suffix(".confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _idx_dataset(folder: Path, images: np.ndarray, labels: np.ndarray) -> str:
    from fedsq_app.data.sources import write_idx

    folder.mkdir(parents=True)
    write_idx(folder / "test-images-idx3-ubyte.gz", images)
    write_idx(folder / "test-labels-idx1-ubyte.gz", labels)
    return f"idx:{folder}"


def test_predict_on_other_data_and_unlabelled_files(finished_run, tmp_path, capsys):
    """Another dataset (IDX files) and an image folder, whose rows are named by file path."""
    from PIL import Image

    from fedsq_app.tools.predict import main

    rng = np.random.default_rng(0)
    spec = _idx_dataset(tmp_path / "idx", rng.integers(0, 255, (50, 28, 28)), rng.integers(0, 10, 50))
    assert main([str(finished_run), "--dataset", spec, "--split", "test[:20]", "--out",
                 str(tmp_path / "idx.csv"), "--no-progress"]) == 0
    assert len(list(csv.DictReader((tmp_path / "idx.csv").open()))) == 20
    (tmp_path / "folder").mkdir()
    for i in range(5):  # new images, no labels: one folder of files
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(tmp_path / "folder" / f"new{i}.png")
    capsys.readouterr()
    assert main([str(finished_run), "--dataset", f"imagefolder:{tmp_path / 'folder'}",
                 "--out", str(tmp_path / "folder.csv"), "--no-progress"]) == 0
    rows = list(csv.DictReader((tmp_path / "folder.csv").open()))
    assert sorted(Path(row["id"]).name for row in rows) == [f"new{i}.png" for i in range(5)]
    assert "label" not in rows[0] and "accuracy" not in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing-backbone", "other-S", "class-count", "image-size", "channels",
                                  "labels-beyond-head"])
def test_predict_refuses_clearly(finished_run, tmp_path, capsys, case):
    from PIL import Image

    from fedsq_app.runtime.models import load_checkpoint, save_checkpoint
    from fedsq_app.tools.predict import main

    run_dir, args = finished_run, []
    rng = np.random.default_rng(1)
    backbone = json.loads((finished_run / "best_model.safetensors.json").read_text())["pretrained_from"]
    if case == "missing-backbone":
        args = ["--backbone", str(tmp_path / "gone.safetensors")]
        expected = "backbone is missing"
    elif case == "other-S":
        weights, meta = load_checkpoint(backbone)
        first = next(k for k, v in weights.items() if v.is_floating_point())
        weights[first] = weights[first] + 0.01
        save_checkpoint(tmp_path / "other.safetensors", weights, meta)
        args = ["--backbone", str(tmp_path / "other.safetensors")]
        expected = "is not the S this model was trained under"
    elif case == "class-count":
        run_dir = tmp_path / "run"
        shutil.copytree(finished_run, run_dir)
        sidecar = run_dir / "best_model.safetensors.json"
        meta = json.loads(sidecar.read_text())
        meta["run_config"]["num-classes"] = 12
        sidecar.write_text(json.dumps(meta))
        expected = "does not fit the run's model"
    elif case == "image-size":
        args = ["--dataset", _idx_dataset(tmp_path / "big", rng.integers(0, 255, (4, 32, 32)), np.arange(4))]
        expected = "images are 32x32; this model takes 1x28x28"
    elif case == "channels":
        (tmp_path / "rgb").mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(tmp_path / "rgb" / f"{i}.png")
        args = ["--dataset", f"imagefolder:{tmp_path / 'rgb'}"]
        expected = "images have 3 channels; this model takes 1x28x28"
    else:
        args = ["--dataset", _idx_dataset(tmp_path / "many", rng.integers(0, 255, (4, 28, 28)), np.array([0, 3, 11, 2]))]
        expected = "has labels up to 11, but the model predicts 10 classes"
    out = tmp_path / "p.csv"
    assert main([str(run_dir), "--out", str(out), "--no-progress", *args]) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists()


def on_a_gate_boundary(trained, images: torch.Tensor, tolerance: float = 1e-4) -> torch.Tensor:
    """Per image: does a nudge of 1e-6 to its pixels move the eager model's logits by more than ``tolerance``?
    Such an image has a unit whose pre-activation in S lies within float rounding of 0, so another backend's
    summation order may switch that gate (the gated function is discontinuous there)."""
    from fedsq_app.tools.export import Standalone

    module = Standalone(trained).eval()
    pixels = images.float().div(255)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        base = module(pixels)
        moved = torch.zeros(len(images), dtype=torch.bool)
        for _ in range(16):
            nudged = pixels + 1e-6 * torch.randn(pixels.shape, generator=generator)
            moved |= (module(nudged) - base).abs().amax(dim=1) > tolerance
    return moved


def test_export_onnx_and_torchscript_equal_the_eager_model(finished_run, tmp_path):
    """Both files hold S and Q (gates inside the graph) and run without fedsq's code. On the run's whole test
    split: the same predictions, and logits within 1e-4 of the eager model's, except on images that sit on a
    gate boundary (where ONNX Runtime's kernels, summing in another order, may switch one gate)."""
    from fedsq_app import load_trained
    from fedsq_app.data.partitions import DataKey, server_split
    from fedsq_app.tools.export import load_exported, main

    trained = load_trained(finished_run)
    test = server_split(DataKey.of(trained.config), "test")
    with torch.no_grad():
        eager = torch.cat([trained.logits(test.images[i: i + 500]) for i in range(0, len(test), 500)]).numpy()
    pixels = test.images.float().div(255).numpy()
    for fmt, name in (("onnx", "model.onnx"), ("torchscript", "model.pt")):
        out = tmp_path / name
        assert main([str(finished_run), "--format", fmt, "--out", str(out)]) == 0
        description = json.loads(Path(f"{out}.json").read_text())
        assert description["input"]["shape"] == ["N", 1, 28, 28] and description["gated"]
        run = load_exported(out)
        exported = np.concatenate([run(pixels[i: i + 500]) for i in range(0, len(pixels), 500)])
        assert (exported.argmax(1) == eager.argmax(1)).all(), fmt
        apart = np.flatnonzero(np.abs(exported - eager).max(axis=1) > 1e-4)
        if fmt == "torchscript":  # the same kernels as eager: no gate moves
            assert len(apart) == 0
        assert len(apart) <= len(test) // 200, f"{fmt}: {len(apart)} images apart"
        if len(apart):
            assert on_a_gate_boundary(trained, test.images[apart]).all(), f"{fmt}: {apart} not on a boundary"


def test_onnx_graph_holds_both_copies(finished_run, tmp_path):
    """The ONNX file alone gates: its ReLU-free Q path needs S's activations, so it carries S's convolutions
    too (twice the plain network's), and onnxruntime runs it with no fedsq import."""
    import onnx

    from fedsq_app.tools.export import main

    out = tmp_path / "m.onnx"
    assert main([str(finished_run), "--format", "onnx", "--out", str(out)]) == 0
    graph = onnx.load(str(out)).graph
    convs = sum(node.op_type == "Conv" for node in graph.node)
    assert convs == 6  # the small CNN's three convolutions, in S and in Q
    script = ("import sys, numpy, onnxruntime; s = onnxruntime.InferenceSession(sys.argv[1]); "
              "y = s.run(None, {'pixels': numpy.zeros((3, 1, 28, 28), numpy.float32)})[0]; "
              "assert y.shape == (3, 10) and not any(m.startswith('fedsq') for m in sys.modules); print('ok')")
    done = subprocess.run([sys.executable, "-I", "-c", script, str(out)], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr
