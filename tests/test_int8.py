"""int8 frozen weights (`frozen_dtype="int8"`): per-output-channel scales, the same computation as a float model
holding the dequantized weights, exact `restore`, the model file's int8 storage, exports, refusals."""

import copy

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import bsr
from bsr import BSRConfig, BSRError
from bsr.core.frozen import FrozenInt8Linear, dequantize_rows, quantize_rows

CFG = dict(trainable_blocks="1,3", drop_blocks="1,2", keep_rate=0.5)


def make():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, num_classes=5)


def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)


def test_rows_quantize_symmetrically_to_127():
    w = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [3.0, 1.5, -0.03]])
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().amax(1).tolist() == [127, 0, 127]
    assert scale.tolist()[1] == 1.0  # a zero row
    assert (dequantize_rows(q, scale) - w).abs().max() <= scale.max() / 2 + 1e-7
    assert torch.equal(quantize_rows(dequantize_rows(q, scale))[0], q)  # the grid is a fixed point


def test_int8_computes_what_a_float_model_with_the_dequantized_weights_computes():
    model = bsr.reprogram(make(), BSRConfig(**CFG, frozen_dtype="int8"))
    frozen = [m for m in model.modules() if isinstance(m, FrozenInt8Linear)]
    assert len(frozen) == 2 * 4 and all(m.weight.dtype == torch.int8 and not m.weight.requires_grad for m in frozen)
    reference = bsr.restore(copy.deepcopy(model))  # float Linears holding q * scale
    bsr.reprogram(reference, BSRConfig(**CFG))
    x = images()
    out, ref = model(x), reference(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.square().sum().backward(), ref.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4)


def test_state_dict_is_float_with_the_hosts_keys_and_restore_is_exact():
    host = make()
    keys = list(host.state_dict())
    model = bsr.reprogram(copy.deepcopy(host), BSRConfig(**CFG, frozen_dtype="int8"))
    state = model.state_dict()
    assert list(state) == keys and all(v.is_floating_point() for k, v in state.items() if k.endswith("weight"))
    qkv = model.blocks[0].attn.qkv
    expected = dequantize_rows(qkv.weight, qkv.weight_scale)
    assert torch.equal(state["blocks.0.attn.qkv.weight"], expected)
    err = (expected - host.blocks[0].attn.qkv.weight).abs().max()
    assert 0 < err <= qkv.weight_scale.max() / 2 + 1e-7  # rounded to the per-row grid, no further
    again = copy.deepcopy(model)
    again.load_state_dict(state)
    assert torch.equal(again.blocks[0].attn.qkv.weight, qkv.weight)
    bsr.restore(model)
    assert type(model.blocks[0].attn.qkv) is torch.nn.Linear and torch.equal(model.blocks[0].attn.qkv.weight, expected)
    assert "weight_scale" not in dict(model.blocks[0].attn.qkv.named_buffers())


def test_the_model_file_stores_int8_with_scales_and_loads_back(tmp_path):
    from bsr.deploy import load_model, save_model
    from bsr.train.build import read_weights

    model = bsr.reprogram(make(), BSRConfig(**CFG, frozen_dtype="int8")).eval()
    save_model(model, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert f.get_tensor("blocks.0.mlp.fc1.weight").dtype == torch.int8
        assert f.get_tensor("blocks.0.mlp.fc1.weight_scale").dtype == torch.float32
        assert f.get_tensor("blocks.1.mlp.fc1.weight").dtype == torch.float32  # a trained block stays float
    loaded = load_model(tmp_path / "m.safetensors")
    assert isinstance(loaded.blocks[0].mlp.fc1, FrozenInt8Linear)
    with torch.no_grad():
        assert torch.equal(loaded(images()), model(images()))
    base = read_weights(tmp_path / "m.safetensors")  # as base weights of a float model: float, exactly
    assert base["blocks.0.mlp.fc1.weight"].dtype == torch.float32
    assert torch.equal(base["blocks.0.mlp.fc1.weight"], model.state_dict()["blocks.0.mlp.fc1.weight"])


def test_int8_weights_without_scales_are_refused_in_one_line(tmp_path):
    from bsr.train.build import read_weights

    save_file({"blocks.0.mlp.fc1.weight": torch.zeros(4, 4, dtype=torch.int8)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(BSRError, match="int8 tensors without bsr's per-channel scales") as info:
        read_weights(tmp_path / "w.safetensors")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("method", ["lora", "last-k", "full", "tokendrop"])
def test_low_precision_frozen_weights_with_a_method_that_would_ignore_them_are_refused(method):
    from bsr.train import make_config

    for bsr_options in ({"frozen_dtype": "int8"}, {"preset": "lean"}):
        with pytest.raises(BSRError, match=f"--method {method} would ignore it") as info:
            make_config({"method": method, "bsr": bsr_options})
        assert "\n" not in str(info.value)
    make_config({"method": "bsr", "bsr": {"frozen_dtype": "int8"}})  # what it is for


def test_onnx_export_of_an_int8_model_matches_pytorch(tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    from bsr.deploy import export_onnx, verify_onnx

    model = bsr.reprogram(make(), BSRConfig(**CFG, frozen_dtype="int8")).eval()
    export_onnx(model, tmp_path / "m.onnx")
    result = verify_onnx(model, tmp_path / "m.onnx", images())
    assert result["max_abs_diff"] < 1e-4 and result["top1_agreement"] == 1.0, result
    assert isinstance(model.blocks[0].attn.qkv, FrozenInt8Linear)  # the caller's model is unchanged


def test_int8_under_autocast_runs_in_the_autocast_dtype():
    model = bsr.reprogram(make(), BSRConfig(**CFG, frozen_dtype="int8"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images())
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all() and model.blocks[1].attn.qkv.weight.grad is not None


def test_the_trace_counts_int8_weights_as_one_byte():
    from bsr.measure.trace import trace_config
    from bsr.train import make_config

    base = dict(model="vit_micro_patch4_28", checkpoint="none", batch_size=4, threads=1)
    f32 = trace_config(make_config({**base, "bsr": {"frozen_dtype": "float32"}}), 10)
    i8 = trace_config(make_config({**base, "bsr": {"frozen_dtype": "int8"}}), 10)
    assert i8.param_bytes < f32.param_bytes * 0.5


def test_bench_methods_take_an_int8_suffix():
    from bsr.measure.bench_spec import BenchSpec, method_config

    spec = BenchSpec(methods=["bsr-lean", "bsr-lean+int8"])
    spec.check()
    assert method_config(spec, "bsr-lean")[1].frozen_dtype == "bfloat16"
    method, config = method_config(spec, "bsr-lean+int8")
    assert method == "bsr" and config.frozen_dtype == "int8" and config.recompute == "all"
    with pytest.raises(BSRError, match="use it on bsr"):
        BenchSpec(methods=["full+int8"]).check()


def test_device_artifacts_keep_int8_frozen_weights_in_int8(tmp_path):
    """On-device training artifacts of an int8 model: the frozen weights are int8 frozen parameters of the ORT
    checkpoint (a quarter of their float bytes) behind DequantizeLinear, and ORT trains what PyTorch trains."""
    pytest.importorskip("onnxruntime.training", reason="onnxruntime-training is not installed")
    from bsr.train import make_config
    from bsr.train.device import export_device, verify_device
    from bsr.train.methods import host
    from bsr.train import setup_model

    sizes = {}
    for dtype in ("float32", "int8"):
        cfg = make_config({"model": "vit_micro_patch4_28", "checkpoint": "none", "img_size": 16, "lr": 1e-4,
                           "bsr": {"frozen_dtype": dtype}})
        record = export_device(cfg, tmp_path / dtype)
        sizes[dtype] = record["files"]["checkpoint"]
    assert sizes["int8"] < 0.6 * sizes["float32"]
    model = setup_model(cfg, torch.device("cpu"), 10)
    result = verify_device(tmp_path / "int8", cfg, host(model), steps=3, batch=4)
    assert result["max_loss_diff"] < 1e-4, result
