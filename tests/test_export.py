"""ONNX export (swin.export, `swin export`): onnxruntime's logits equal the model's, at batch sizes
other than the traced one, on padded non-square maps; nothing is written when the check fails."""
from __future__ import annotations

import pytest
import torch

import swin
from swin import cli
from swin import export as X

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")


def _perturbed(name: str) -> swin.SwinTransformer:
    """A micro model whose zero-initialised tables and biases are random too, so that every
    parameter reaches the logits."""
    torch.manual_seed(0)
    model = swin.create_model(name, num_classes=10).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("name", ["swin_micro", "swinv2_micro"])
def test_onnx_logits_equal_the_model_at_any_batch(name, tmp_path):
    """36 x 28 input: padded stage maps, shifted and unshifted blocks; the graph's batch is dynamic."""
    model = _perturbed(name)
    path = tmp_path / f"{name}.onnx"
    r = X.export_onnx(model, path, img_size=(36, 28), metadata={"note": "test"})
    assert r["max_rel_err"] <= 1e-5 and path.is_file()
    graph = onnx.load(str(path))
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["swin.img_size"] == "36,28" and meta["swin.num_classes"] == "10" and meta["note"] == "test"
    assert meta["swin.version"] == str(model.config.version)
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert graph.graph.input[0].name == "pixel_values" and dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 36, 28]
    session = X.onnx_session(path, threads=1)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 36, 28)
        with torch.inference_mode():
            ref = model(x)
        out = session.run(None, {"pixel_values": x.numpy()})[0]
        assert out.shape == (batch, 10)
        assert X.rel_err(out, ref) <= 1e-5, (name, batch, X.rel_err(out, ref))
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed


def test_onnx_fixed_batch_never_overwrites_and_writes_nothing_on_a_failed_check(tmp_path, monkeypatch):
    model = _perturbed("swin_micro")
    path = tmp_path / "m.onnx"
    X.export_onnx(model, path, batch=2)
    assert [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim] == [2, 3, 32, 32]
    before = path.read_bytes()
    with pytest.raises(ValueError, match="already exists"):
        X.export_onnx(model, path)
    with pytest.raises(ValueError, match="batch must be a positive number"):
        X.export_onnx(model, tmp_path / "zero.onnx", batch=0)
    with pytest.raises(ValueError, match="is a folder"):  # not "already exists ... pass force=True"
        X.export_onnx(model, tmp_path)
    with pytest.raises(ValueError, match=r"export the fp32 model \(model.float\(\)\)"):
        X.export_onnx(model.bfloat16(), tmp_path / "bf16.onnx")
    model.float()
    # past what torch.onnx converts to it kept opset 18 with newer ops inside, declared as 18 (a file
    # onnxruntime refuses): refused in one sentence, nothing written
    with pytest.raises(ValueError, match="could not write opset 99"):
        X.export_onnx(model, tmp_path / "o99.onnx", opset=99, check=False)
    assert not (tmp_path / "o99.onnx").exists()

    class WrongSession:  # a graph whose logits are off: the export must stop and keep the old file
        def run(self, names, feeds):
            return [torch.zeros(feeds["pixel_values"].shape[0], 10).numpy()]

    monkeypatch.setattr(X, "onnx_session", lambda path, threads=None: WrongSession())
    with pytest.raises(RuntimeError, match="was not written"):
        X.export_onnx(model, path, batch=2, force=True)
    assert path.read_bytes() == before and not list(tmp_path.glob(".*tmp*"))
    assert model.training is False


def test_cli_export_stores_the_normalisation_and_refuses_to_overwrite(tmp_path, capsys):
    model = _perturbed("swin_micro")
    torch.save(model.state_dict(), tmp_path / "w.pth")
    out = tmp_path / "onnx" / "w.onnx"
    assert cli.main(["export", str(tmp_path / "w.pth"), str(out), "--model", "swin_micro", "--img-size", "40"]) == 0
    printed = capsys.readouterr().out
    assert "pixel_values (N, 3, 40, 40)" in printed and "onnxruntime's logits within" in printed
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["swin.mean"] == "0.485,0.456,0.406" and meta["swin.img_size"] == "40,40"
    x = torch.randn(2, 3, 40, 40)
    with torch.inference_mode():
        ref = model(x)
    assert X.rel_err(X.onnx_session(out).run(None, {"pixel_values": x.numpy()})[0], ref) <= 1e-5
    assert cli.main(["export", str(tmp_path / "w.pth"), str(out), "--model", "swin_micro"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already exists" in err and err.count("\n") == 1
    assert cli.main(["export", str(tmp_path / "nope.pth"), str(tmp_path / "n.onnx"), "--model", "swin_micro"]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "n.onnx").exists()


@pytest.mark.skipif(torch.__version__ < (2, 11),
                    reason="torch.onnx writes GELU as one node from torch 2.11 on (2.6-2.7 decompose it)")
def test_default_opset_writes_gelu_as_one_node_and_18_still_exports(tmp_path):
    """Opset 20 (the default where torch.onnx writes it): one standard Gelu node per block, which
    onnxruntime runs as one kernel; at opset 18 GELU is Div/Erf/Add/Mul/Mul, which it does not fuse.
    Both give the model's logits."""
    model = _perturbed("swin_micro")
    blocks = sum(model.config.depths)
    for opset, gelus in ((None, blocks), (18, 0)):
        path = tmp_path / f"o{opset}.onnx"
        r = X.export_onnx(model, path, img_size=32, opset=opset)
        graph = onnx.load(str(path))
        ops = [n.op_type for n in graph.graph.node]
        assert r["max_rel_err"] <= 1e-5 and ops.count("Gelu") == gelus, (opset, ops.count("Gelu"))
        assert graph.opset_import[0].version == (opset or X.default_opset())
    assert X.default_opset() == (20 if X._max_opset() >= 20 else 18)
