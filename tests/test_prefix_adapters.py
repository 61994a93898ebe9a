"""Swappable prefixes: one graph exported with ``prefix_as="adapter_inputs"``, several ``.onnx_adapter`` files bound
per call. Each adapter's ONNX Runtime output must match PyTorch running that adapter, both in absolute terms and
relative to the prefix's own effect (so a binding that silently fell back to the graph's default prefix fails)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from exporters.cli import main as cli_main  # noqa: E402
from exporters.onnx import (  # noqa: E402
    PrefixAdapterMismatch,
    check_output_dir,
    export,
    export_prefix_adapter,
    load,
)
from ptv2_plugin import PTuningV2Config  # noqa: E402
from ptv2_plugin.transformers_compat import cache_from_output, cache_kwargs  # noqa: E402
from tests.exporter_matrix import DYNAMO, TORCHSCRIPT, only  # noqa: E402
from tests.parity import assert_parity  # noqa: E402
from tests.test_export_onnx import batch, peft_model  # noqa: E402
from tests.tiny_models import tiny_model  # noqa: E402

ADAPTERS = ("a", "b", "c")
CASES = {"bert": "SEQ_CLS", "llama": "CAUSAL_LM"}


def several_adapters(arch: str, names=ADAPTERS, n: int = 3):
    """A PeftModel with adapters whose prefixes and (for classifiers) heads all differ, as after training."""
    task = CASES[arch]
    model = peft_model(arch, task, name=names[0], n=n)
    for seed, name in enumerate(names[1:], start=1):
        torch.manual_seed(seed)
        model.add_adapter(name, PTuningV2Config(task_type=task, num_virtual_tokens=n, prefix_init_std=1.0))
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if ".modules_to_save." in param_name:
                param.add_(torch.randn_like(param))
    return model.eval()


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """arch -> (PeftModel, graph folder, {adapter: file}); the graph is exported once, with adapter "a"."""
    cache = {}

    def get(arch: str, exporter: str = DYNAMO):
        if (arch, exporter) not in cache:
            root = tmp_path_factory.mktemp(f"swap-{arch}-{exporter}")
            model = several_adapters(arch)
            folder = export(model, root / "graph", adapter_name="a", prefix_as="adapter_inputs", exporter=exporter)
            files = {name: export_prefix_adapter(model, root / f"{name}.onnx_adapter", adapter_name=name)
                     for name in ADAPTERS}
            cache[(arch, exporter)] = (model, folder, files)
        return cache[(arch, exporter)]

    return get


def assert_close(reference: torch.Tensor, actual: torch.Tensor, without_prefix: torch.Tensor, what: str,
                 dtype: str = "float32") -> None:
    """ONNX Runtime within the exporter's parity tolerance for ``dtype`` (``tests.parity``, which also requires the
    tolerance and the error to be well below the prefix's effect)."""
    effect = (reference - without_prefix).abs().max().item()
    assert effect > 1e-2, f"{what}: the adapter barely changes the output ({effect:.3g}); the test proves nothing"
    assert_parity(actual, reference, without_prefix=without_prefix, dtype=dtype, context=what)


def torch_logits(model, name: str | None, **inputs) -> torch.Tensor:
    with torch.no_grad():
        if name is None:
            with model.disable_adapter():
                return model(**inputs).logits
        model.set_adapter(name)
        return model(**inputs).logits


def test_swappable_graph_is_an_ordinary_export(deployed):
    """A prefix_as='adapter_inputs' folder goes through the same atomic swap, tolerance-based validation and
    written_files bookkeeping as any export, so --force can replace it later and nothing else."""
    _, folder, _ = deployed("bert")
    metadata = json.loads((folder / "ptv2_export.json").read_text())
    assert metadata["prefix_as"] == "adapter_inputs" and metadata["base_fingerprint"]
    assert metadata["parity"]["ok"] and metadata["parity"]["rtol"] > 0
    assert sorted(metadata["written_files"]) == sorted(p.name for p in folder.iterdir())
    check_output_dir(folder, force=True)  # an earlier export and nothing else: replaceable
    assert not [p for p in folder.parent.iterdir() if ".ptv2-new-" in p.name or ".ptv2-old-" in p.name]


@pytest.mark.parametrize("exporter", only(DYNAMO, TORCHSCRIPT))
@pytest.mark.parametrize("io_binding", [False, True])
def test_encoder_each_adapter_file_matches_pytorch(deployed, io_binding, exporter):
    model, folder, files = deployed("bert", exporter)
    runtime = load(folder, use_io_binding=io_binding)
    session = runtime.session
    for name, path in files.items():
        assert runtime.load_prefix_adapter(path) == name
    assert runtime.session is session  # loading adapters never rebuilds the session
    inputs = batch(3, 7, right_pad=2, seed=3)
    without = torch_logits(model, None, **inputs)
    outputs = {}
    for name in ADAPTERS:
        outputs[name] = runtime(**inputs, adapter=name).logits
        assert_close(torch_logits(model, name, **inputs), outputs[name], without, f"bert adapter {name}")
    assert (outputs["b"] - outputs["c"]).abs().max() > 1e-2  # adapters really swap
    default = runtime(**inputs).logits  # no adapter: the graph's own (exported) adapter "a"
    assert_parity(default, outputs["a"], context="bert graph's own adapter")


@pytest.mark.parametrize("exporter", only(DYNAMO, TORCHSCRIPT))
def test_decoder_each_adapter_with_past_and_generate(deployed, exporter):
    model, folder, files = deployed("llama", exporter)
    runtime = load(folder)
    for name, path in files.items():
        runtime.load_prefix_adapter(path, name)
    inputs = batch(2, 5, left_pad=2, seed=5)
    inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    step = {"input_ids": torch.tensor([[7], [9]])}
    step["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
    step["position_ids"] = step["attention_mask"].sum(-1, keepdim=True) - 1
    with torch.no_grad(), model.disable_adapter():
        without = model(**step, **cache_kwargs(cache_from_output(model(**inputs, use_cache=True)))).logits
    for name in ADAPTERS:
        model.set_adapter(name)
        with torch.no_grad():
            first = model(**inputs, use_cache=True)
            reference = model(**step, **cache_kwargs(cache_from_output(first)), use_cache=True).logits
        ort_first = runtime(**inputs, adapter=name)
        actual = runtime(**step, **cache_kwargs(cache_from_output(ort_first)), adapter=name).logits
        assert_close(first.logits, ort_first.logits, torch_logits(model, None, **inputs), f"llama {name} prompt")
        assert_close(reference, actual, without, f"llama {name} step with past")
        prompt = batch(1, 4, seed=6)
        with torch.no_grad():
            expected = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert runtime.generate(**prompt, max_new_tokens=5, adapter=name).tolist() == expected.tolist()


def test_files_record_base_and_geometry(deployed):
    _, folder, files = deployed("bert")
    sidecar = json.loads(files["b"].with_name("b.onnx_adapter.json").read_text())
    metadata = json.loads((folder / "ptv2_export.json").read_text())
    assert sidecar["format"] == "ptv2-prefix-adapter/1" and sidecar["adapter_name"] == "b"
    assert sidecar["base_fingerprint"] == metadata["base_fingerprint"] and metadata["prefix_as"] == "adapter_inputs"
    assert sidecar["num_virtual_tokens"] == 3 and sidecar["task"] == "SEQ_CLS"
    assert sidecar["parameters"]["ptv2.prefix.0.key"]["shape"] == [4, 3, 8]
    assert "ptv2.head.classifier.weight" in sidecar["parameters"]


def test_mismatched_adapters_are_refused(deployed, tmp_path):
    model, folder, _ = deployed("bert")
    runtime = load(folder)
    longer = several_adapters("bert", names=("long",), n=4)  # same base weights (seed 0), longer prefix
    path = export_prefix_adapter(longer, tmp_path / "long.onnx_adapter")
    with pytest.raises(PrefixAdapterMismatch, match="num_virtual_tokens"):
        runtime.load_prefix_adapter(path)
    other_base = several_adapters("bert", names=("other",))
    with torch.no_grad():
        next(other_base.base_model.model.bert.parameters()).add_(1.0)  # another backbone, same shapes
    path = export_prefix_adapter(other_base, tmp_path / "other.onnx_adapter")
    with pytest.raises(PrefixAdapterMismatch, match="base model"):
        runtime.load_prefix_adapter(path)
    path.with_name(path.name + ".json").unlink()  # without its sidecar, model_version still tells
    with pytest.raises(PrefixAdapterMismatch, match="base model"):
        runtime.load_prefix_adapter(path)
    assert runtime.prefix_adapters == {}
    with pytest.raises(KeyError, match="No prefix adapter named 'b'"):
        runtime(**batch(1, 4), adapter="b")
    with pytest.raises(FileExistsError):
        export_prefix_adapter(model, tmp_path / "long.onnx_adapter", adapter_name="a")


def test_constant_graphs_and_unsupported_combinations_are_refused(tmp_path):
    model = several_adapters("bert", names=("a", "b"))
    folder = export(model, tmp_path / "constants", adapter_name="a", validate=False)
    path = export_prefix_adapter(model, tmp_path / "b.onnx_adapter", adapter_name="b")
    with pytest.raises(ValueError, match="prefix_as='adapter_inputs'"):
        load(folder).load_prefix_adapter(path)
    with pytest.raises(ValueError, match="single-adapter graph"):
        export(model, tmp_path / "multi", adapters=["a", "b"], prefix_as="adapter_inputs")
    with pytest.raises(ValueError, match="prefix_as must be"):
        export(model, tmp_path / "bad", prefix_as="inputs")


def test_cli_writes_an_adapter_file(tmp_path):
    base = tiny_model("bert", "SEQ_CLS")
    base.save_pretrained(tmp_path / "base")
    model = several_adapters("bert", names=("default",))
    model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "sst2.onnx_adapter"
    assert cli_main(["--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                     "--output", str(tmp_path / "graph"), "--prefix-as", "adapter_inputs", "--prefix-capacity", "4",
                     "--adapter-file", str(out)]) == 0
    sidecar = json.loads((tmp_path / "sst2.onnx_adapter.json").read_text())
    assert sidecar["adapter_name"] == "default" and sidecar["prefix_capacity"] == 4 and out.is_file()
    runtime = load(tmp_path / "graph")
    runtime.load_prefix_adapter(out, "sst2")
    inputs = batch(2, 5, seed=2)
    assert_parity(runtime(**inputs, adapter="sst2").logits, torch_logits(model, "default", **inputs),
                  without_prefix=torch_logits(model, None, **inputs), context="cli adapter file")
    import onnxruntime as ort

    tensors = ort.AdapterFormat.read_adapter(str(out)).get_parameters()
    expected = model.base_model.prefix_encoder("default").all_key_values()[1][0].detach().numpy()
    stored = tensors["ptv2.prefix.1.key"].numpy()  # (kv_heads, capacity 4, head_dim): 3 real tokens, then zeros
    np.testing.assert_allclose(stored[:, :3], expected, atol=1e-6)
    assert not stored[:, 3:].any() and tensors["ptv2.prefix.length"].numpy().tolist() == [3]


def test_float16_graph_takes_float16_adapter_files_only(tmp_path):
    model = several_adapters("bert", names=("a", "b"))
    folder = export(model, tmp_path / "graph", adapter_name="a", prefix_as="adapter_inputs", dtype="float16")
    runtime = load(folder)
    runtime.load_prefix_adapter(export_prefix_adapter(model, tmp_path / "b.onnx_adapter", adapter_name="b",
                                                      dtype="float16"))
    inputs = batch(2, 5, seed=3)
    expected = torch_logits(model, "b", **inputs)
    assert_close(expected, runtime(**inputs, adapter="b").logits.float(), torch_logits(model, None, **inputs),
                 "float16 adapter b", dtype="float16")
    with pytest.raises(PrefixAdapterMismatch, match="float32 .* the graph takes float16"):
        runtime.load_prefix_adapter(export_prefix_adapter(model, tmp_path / "b32.onnx_adapter", adapter_name="b"))


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_prefix_capacity_lets_adapters_of_different_lengths_share_a_graph(tmp_path, arch):
    """A graph with room for 5 prefix tokens serves adapters of 2, 3 and 5 tokens: files padded to 5, the padding
    masked through ptv2.prefix.length; each matches PyTorch running that adapter."""
    task = CASES[arch]
    model = peft_model(arch, task, name="three", n=3)
    for seed, (name, n) in enumerate((("two", 2), ("five", 5)), start=1):
        torch.manual_seed(seed)
        model.add_adapter(name, PTuningV2Config(task_type=task, num_virtual_tokens=n, prefix_init_std=1.0))
    with torch.no_grad():  # trained-size heads: the tiny classifier's logits are otherwise too small to compare
        for param_name, param in model.named_parameters():
            if ".modules_to_save." in param_name:
                param.add_(torch.randn_like(param))
    model.eval()
    folder = export(model, tmp_path / "graph", adapter_name="three", prefix_as="adapter_inputs", prefix_capacity=5)
    assert json.loads((folder / "ptv2_export.json").read_text())["prefix_capacity"] == 5
    runtime = load(folder)
    for name in ("two", "three", "five"):
        runtime.load_prefix_adapter(export_prefix_adapter(model, tmp_path / f"{name}.onnx_adapter", adapter_name=name,
                                                          prefix_capacity=5))
    inputs = batch(2, 6, **({"left_pad": 2} if task == "CAUSAL_LM" else {"right_pad": 2}), seed=7)
    if task == "CAUSAL_LM":
        inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    without = torch_logits(model, None, **inputs)
    for name in ("two", "three", "five"):
        assert_close(torch_logits(model, name, **inputs), runtime(**inputs, adapter=name).logits, without,
                     f"{arch} {name} in a capacity-5 graph")
    if task == "CAUSAL_LM":
        prompt = batch(1, 4, seed=6)
        model.set_adapter("two")
        with torch.no_grad():
            expected = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert runtime.generate(**prompt, max_new_tokens=4, adapter="two").tolist() == expected.tolist()
    unpadded = export_prefix_adapter(model, tmp_path / "plain.onnx_adapter", adapter_name="two")
    with pytest.raises(PrefixAdapterMismatch, match="prefix_capacity=5"):
        runtime.load_prefix_adapter(unpadded)
    with pytest.raises(ValueError, match="more than the prefix_capacity"):
        export_prefix_adapter(model, tmp_path / "big.onnx_adapter", adapter_name="five", prefix_capacity=4)
