"""ONNX export: PyTorch vs ONNX Runtime (CPU) parity for every supported architecture, and the graph's contents."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from peft import get_peft_model  # noqa: E402

from exporters.onnx import (  # noqa: E402
    ExportValidationError,
    ORTModelForCausalLM,
    ORTModelForFeatureExtraction,
    ORTModelForQuestionAnswering,
    ORTModelForSequenceClassification,
    ORTModelForTokenClassification,
    export,
)
from exporters.onnx.validate import check_parity  # noqa: E402
from ptv2_plugin import PTuningV2Config  # noqa: E402
from ptv2_plugin.transformers_compat import cache_from_output, cache_kwargs  # noqa: E402
from tests.exporter_matrix import DYNAMO, TORCHSCRIPT, only, over_exporters  # noqa: E402
from tests.parity import assert_parity  # noqa: E402
from tests.tiny_models import ARCHITECTURES, DECODERS, ENCODERS, VOCAB, default_task, tiny_model  # noqa: E402

N = 3
RUNTIME = {
    "SEQ_CLS": ORTModelForSequenceClassification,
    "TOKEN_CLS": ORTModelForTokenClassification,
    "QUESTION_ANS": ORTModelForQuestionAnswering,
    "FEATURE_EXTRACTION": ORTModelForFeatureExtraction,
    "CAUSAL_LM": ORTModelForCausalLM,
}
OUTPUTS = {"QUESTION_ANS": ("start_logits", "end_logits"), "FEATURE_EXTRACTION": ("last_hidden_state",)}


def peft_model(arch: str, task: str | None = None, *, seed: int = 0, n: int = N, name: str = "default"):
    task = task or default_task(arch)
    torch.manual_seed(seed)
    config = PTuningV2Config(task_type=task, num_virtual_tokens=n, prefix_init_std=1.0)
    return get_peft_model(tiny_model(arch, task), config, adapter_name=name).eval()


def batch(batch_size: int, length: int, *, left_pad: int = 0, right_pad: int = 0, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, length), generator=generator)
    mask = torch.ones_like(ids)
    if batch_size > 1 and left_pad:
        mask[-1, :left_pad] = 0
    if batch_size > 1 and right_pad:
        mask[-1, length - right_pad :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def without_prefix(model, **inputs):
    """The PyTorch outputs with the adapter disabled: what a graph that lost its prefix would compute."""
    with torch.no_grad(), model.disable_adapter():
        return model(**inputs)


def zero_prefix(folder: Path, target: Path) -> Path:
    """A copy of an exported folder whose prefix initializers are all zeros (keys and values)."""
    shutil.copytree(folder, target)
    for path in target.glob("*.onnx"):
        proto = onnx.load(str(path))
        prefix = [t for t in proto.graph.initializer if t.name.startswith("ptv2.prefix.")]
        assert prefix, path
        for tensor in prefix:
            array = onnx.numpy_helper.to_array(tensor)
            tensor.CopyFrom(onnx.numpy_helper.from_array(np.zeros_like(array), tensor.name))
        onnx.save(proto, str(path))
    return target


_EXPORTS: dict = {}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(arch, task, dtype, exporter) -> (PeftModel, folder); one export per combination for the whole module."""

    def get(arch: str, task: str | None = None, dtype: str = "float32", exporter: str = DYNAMO):
        task = task or default_task(arch)
        key = (arch, task, dtype, exporter)
        if key not in _EXPORTS:
            model = peft_model(arch, task)
            folder = export(model, tmp_path_factory.mktemp("-".join(key)) / "onnx", dtype=dtype, exporter=exporter)
            _EXPORTS[key] = (model, folder)
        return _EXPORTS[key]

    yield get
    _EXPORTS.clear()


# ----------------------------------------------------------------------------------------------------- parity
# Every encoder with SEQ_CLS, plus one more task each, cycling so every task runs on several architectures.
_OTHER_TASKS = ["TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"]
ENCODER_CASES = [(a, "SEQ_CLS") for a in ENCODERS] + [(a, _OTHER_TASKS[i % 3]) for i, a in enumerate(ENCODERS)]
# dynamo: one case per encoder, every task on at least one (tests/exporter_matrix.py says why not all)
DYNAMO_ENCODER_CASES = [ENCODER_CASES[i + (i % 2) * len(ENCODERS)] for i in range(len(ENCODERS))]
# architectures whose default-task graph the dynamo parity matrix exports (other tests reuse those folders)
DYNAMO_DEFAULT_TASK = {a for a, task in DYNAMO_ENCODER_CASES if task == default_task(a)} | set(DECODERS)


@pytest.mark.parametrize("arch,task,exporter", over_exporters(ENCODER_CASES, dynamo=DYNAMO_ENCODER_CASES))
def test_encoder_parity_several_shapes_with_padding(exported, arch, task, exporter):
    model, folder = exported(arch, task, exporter=exporter)
    runtime = RUNTIME[task].from_pretrained(folder)
    for size, length, pad in [(1, 1, 0), (2, 6, 2), (4, 9, 5)]:
        inputs = batch(size, length, right_pad=pad, seed=size)
        with torch.no_grad():
            reference = model(**inputs)
        base = without_prefix(model, **inputs)
        actual = runtime(**inputs)
        for name in OUTPUTS.get(task, ("logits",)):
            assert_parity(getattr(actual, name), getattr(reference, name), without_prefix=getattr(base, name),
                          context=(arch, task, size, length, name))
    parity = json.loads((folder / "ptv2_export.json").read_text())["parity"]
    assert parity["ok"] and parity["max_abs_diff"] <= parity["worst_bound"]


@pytest.mark.parametrize("arch,exporter", over_exporters(DECODERS))
def test_decoder_steps_from_empty_past(exported, arch, exporter):
    model, folder = exported(arch, exporter=exporter)
    runtime = ORTModelForCausalLM.from_pretrained(folder)
    for size, length, pad in [(1, 4, 0), (3, 5, 2)]:
        inputs = batch(size, length, left_pad=pad, seed=size)
        mask = inputs["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            reference = model(**inputs, position_ids=positions, use_cache=True)
        base = without_prefix(model, **inputs, position_ids=positions, use_cache=True)
        actual = runtime(**inputs, position_ids=positions)
        assert_parity(actual.logits, reference.logits, without_prefix=base.logits, context=(arch, size))
        for step in range(4):
            # the prefix never enters the cache: present holds exactly the real tokens seen so far
            assert cache_from_output(actual)[0][0].shape[2] == length + step
            assert cache_from_output(reference).get_seq_length() == length + step
            token = torch.randint(3, VOCAB, (size, 1), generator=torch.Generator().manual_seed(step))
            mask = torch.cat([mask, torch.ones(size, 1, dtype=mask.dtype)], dim=1)
            step_inputs = {"input_ids": token, "attention_mask": mask, "position_ids": mask.sum(-1, keepdim=True) - 1}
            with torch.no_grad():
                reference = model(**step_inputs, **cache_kwargs(cache_from_output(reference)), use_cache=True)
            base = without_prefix(model, **step_inputs, **cache_kwargs(cache_from_output(base)), use_cache=True)
            actual = runtime(**step_inputs, **cache_kwargs(cache_from_output(actual)))
            assert_parity(actual.logits, reference.logits, without_prefix=base.logits, context=(arch, size, step))


@pytest.mark.parametrize("arch,exporter", over_exporters(DECODERS))
def test_decoder_generate_gives_identical_tokens(exported, arch, exporter):
    model, folder = exported(arch, exporter=exporter)
    runtime = ORTModelForCausalLM.from_pretrained(folder)
    inputs = batch(3, 5, left_pad=2, seed=7)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(**inputs, **kwargs)
    actual = runtime.generate(**inputs, **kwargs)
    assert actual.tolist() == expected.tolist()
    for row in range(3):  # each row alone, without its padding, continues the same way
        real = inputs["input_ids"][row : row + 1, inputs["attention_mask"][row].bool()]
        alone = runtime.generate(input_ids=real, attention_mask=torch.ones_like(real), **kwargs)
        assert alone[0, -6:].tolist() == expected[row, -6:].tolist(), (arch, row)


# ------------------------------------------------------------------------------------------- graph contents
@pytest.mark.parametrize("arch,exporter", over_exporters(ARCHITECTURES, dynamo=DYNAMO_DEFAULT_TASK))
def test_prefix_is_constant_initializers_and_mlp_is_absent(exported, arch, exporter):
    model, folder = exported(arch, exporter=exporter)
    graph = onnx.load(str(folder / "model.onnx")).graph
    inputs = [i.name for i in graph.input]
    if arch in DECODERS:
        layers = model.config.num_hidden_layers
        past = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
        assert inputs == ["input_ids", "attention_mask", "position_ids", *past]
        assert [o.name for o in graph.output] == ["logits"] + [p.replace("past_key_values", "present") for p in past]
    else:
        expected = ["input_ids", "attention_mask"] + (["token_type_ids"] if arch in ("bert", "electra") else [])
        assert inputs == expected
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    prefix = model.base_model.prefix_encoder().all_key_values()
    for slot, (key, value) in enumerate(prefix):
        np.testing.assert_array_equal(initializers[f"ptv2.prefix.{slot}.key"], key.numpy())
        np.testing.assert_array_equal(initializers[f"ptv2.prefix.{slot}.value"], value.numpy())
    assert len([n for n in initializers if n.startswith("ptv2.prefix.")]) == 2 * len(prefix)
    # no MLP: no initializer is (a transpose of) a prefix-encoder parameter, and none is named after it
    assert not any("prefix_encoder" in name for name in initializers)
    encoder_params = [p.detach().numpy() for p in model.base_model.prefix_encoder().parameters() if p.ndim == 2]
    assert len(encoder_params) == 3  # P, and the MLP's two weight matrices
    for name, array in initializers.items():
        for param in encoder_params:
            for candidate in (param, param.T):
                assert not (array.shape == candidate.shape and np.allclose(array, candidate)), name
    assert len(model.base_model.prefix_encoder().embedding.weight) == N


def _ops_fed_by(graph, name: str, through: tuple[str, ...]) -> set[str]:
    """Op types that read ``name``, following it through the ops in ``through`` (data movement that keeps its
    values: casts, head repetition, transposes)."""
    readers: dict[str, list] = {}
    for node in graph.node:
        for tensor in node.input:
            readers.setdefault(tensor, []).append(node)
    found, todo, seen = set(), [name], set()
    while todo:
        tensor = todo.pop()
        for node in readers.get(tensor, []):
            if node.name in seen:
                continue
            seen.add(node.name)
            found.add(node.op_type)
            if node.op_type in through:
                todo.extend(node.output)
    return found


@pytest.mark.parametrize("arch,exporter", over_exporters(DECODERS))
def test_decoder_graphs_never_concatenate_the_prefix_onto_the_cache(exported, arch, exporter):
    """Split-softmax attention (exporters/onnx/split_attention.py): every layer's prefix keys and values go straight
    into attention's MatMuls; none is concatenated in front of past + new keys, which would copy the whole cache once
    more per layer and decoding step."""
    model, folder = exported(arch, exporter=exporter)
    graph = onnx.load(str(folder / "model.onnx")).graph
    moves = ("Cast", "Unsqueeze", "Expand", "Reshape", "Transpose", "Identity", "Squeeze")
    prefix = [t.name for t in graph.initializer if t.name.startswith("ptv2.prefix.")]
    assert len(prefix) == 2 * model.config.num_hidden_layers
    for name in prefix:
        reached = _ops_fed_by(graph, name, moves)
        assert "MatMul" in reached and "Concat" not in reached, (name, sorted(reached))


@pytest.mark.parametrize("exporter", only(DYNAMO, TORCHSCRIPT))
def test_metadata_and_folder_contents(exported, exporter):
    model, folder = exported("llama", exporter=exporter)
    names = {p.name for p in folder.iterdir()}
    assert {"model.onnx", "config.json", "generation_config.json", "ptv2_export.json"} <= names
    metadata = json.loads((folder / "ptv2_export.json").read_text())
    assert metadata["adapters"] == ["default"] and metadata["num_virtual_tokens"] == N
    assert metadata["task"] == "CAUSAL_LM" and metadata["with_past"] is True
    assert metadata["optimum_task"] == "text-generation-with-past"
    assert (metadata["exporter"], metadata["opset"]) == (exporter, 20 if exporter == DYNAMO else 17)
    assert {"torch", "transformers", "peft", "onnx", "onnxruntime", "ptv2_plugin"} <= set(metadata["versions"])
    parity = metadata["parity"]
    assert parity["ok"] is True and (parity["atol"], parity["rtol"]) == (1e-5, 1e-4)
    assert parity["max_abs_diff"] <= parity["worst_bound"] and parity["provider"] == "CPUExecutionProvider"
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging leftovers


# ---------------------------------------------------------------------------------------------- variants
@pytest.mark.parametrize("arch,exporter", over_exporters(["llama", "qwen2"], dynamo={"llama"}))
def test_decoder_classification_and_no_past_graphs(tmp_path, arch, exporter):
    model = peft_model(arch, "SEQ_CLS")
    model.config.pad_token_id = 0
    folder = export(model, tmp_path / "cls")
    inputs = batch(2, 6, seed=3)
    with torch.no_grad():
        expected = model(**inputs).logits
    assert_parity(ORTModelForSequenceClassification.from_pretrained(folder)(**inputs).logits, expected,
                  without_prefix=without_prefix(model, **inputs).logits)

    lm = peft_model(arch)
    folder = export(lm, tmp_path / "nopast", with_past=False)
    runtime = ORTModelForCausalLM.from_pretrained(folder)
    assert not runtime.can_use_cache and "past_key_values.0.key" not in runtime.input_names
    with torch.no_grad():
        expected = lm.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert runtime.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0).tolist() == expected.tolist()


@pytest.mark.parametrize("arch,exporter", over_exporters(ENCODERS + ["llama"], dynamo={"bert", "llama"}))
def test_float16_export_on_cpu(exported, arch, exporter):
    model, folder = exported(arch, dtype="float16", exporter=exporter)
    proto = onnx.load(str(folder / "model.onnx"))
    fp16 = onnx.TensorProto.FLOAT16
    assert all(o.type.tensor_type.elem_type == fp16 for o in proto.graph.output)
    prefix = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.name.startswith("ptv2.")}
    key = model.base_model.prefix_encoder().all_key_values()[0][0]
    assert prefix["ptv2.prefix.0.key"].dtype == np.float16
    np.testing.assert_allclose(prefix["ptv2.prefix.0.key"].astype(np.float32), key.numpy(), atol=2e-3, rtol=1e-3)
    parity = json.loads((folder / "ptv2_export.json").read_text())["parity"]
    assert parity["ok"] and (parity["atol"], parity["rtol"]) == (2e-3, 1e-2)
    inputs = batch(3, 7, right_pad=0 if arch in DECODERS else 3, seed=11)
    if arch in DECODERS:
        inputs["position_ids"] = torch.arange(7).expand(3, 7)
    with torch.no_grad():
        expected = model(**inputs).logits
    actual = RUNTIME[default_task(arch)].from_pretrained(folder)(**inputs).logits
    assert_parity(actual, expected, without_prefix=without_prefix(model, **inputs).logits, dtype="float16")
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is untouched


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("arch,exporter", over_exporters(ENCODERS, dynamo={"bert"}))
def test_validation_fails_when_the_prefix_is_zeroed_or_dropped(exported, tmp_path, arch, dtype, exporter):
    model, folder = exported(arch, dtype=dtype, exporter=exporter)
    assert check_parity(model, folder).ok
    zeroed = check_parity(model, zero_prefix(folder, tmp_path / "zeroed"))
    assert not zeroed.ok, zeroed.lines()
    with model.disable_adapter():  # PyTorch without the prefix against the graph with it: a dropped prefix
        dropped = check_parity(model, folder)
    assert not dropped.ok, dropped.lines()


@pytest.mark.parametrize("arch,exporter", over_exporters(["distilbert", "llama"], dynamo=()))
def test_export_discards_a_graph_whose_prefix_was_zeroed(tmp_path, monkeypatch, arch, exporter):
    plan_module = importlib.import_module("exporters.onnx.plan")
    frozen = plan_module.frozen_prefix
    monkeypatch.setattr(plan_module, "frozen_prefix",
                        lambda *args: {k: torch.zeros_like(v) for k, v in frozen(*args).items()})
    with pytest.raises(ExportValidationError, match="discarded"):
        export(peft_model(arch), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch,exporter", over_exporters(["bert", "llama"], dynamo={"bert"}))
def test_multi_adapter_export_selects_prefix_per_row(tmp_path, arch, exporter):
    task = default_task(arch)
    model = peft_model(arch, name="a")
    torch.manual_seed(1)
    model.add_adapter("b", PTuningV2Config(task_type=task, num_virtual_tokens=N, prefix_init_std=1.0))
    with torch.no_grad():  # task heads differ after training: each row must get its own adapter's head too
        for name, param in model.named_parameters():
            if "modules_to_save.b." in name:
                param.add_(torch.randn_like(param))
    model.eval()
    folder = export(model, tmp_path / "multi", adapters=["a", "b"])
    runtime = RUNTIME[task].from_pretrained(folder)
    assert runtime.input_names[-1] == "adapter_ids"
    inputs = batch(3, 5, seed=4)
    rows = ["b", "a", "b"]
    expected = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        with torch.no_grad():
            expected[name] = model(**inputs).logits
    base = without_prefix(model, **inputs).logits
    actual = runtime(**inputs, adapter_names=rows).logits
    for row, name in enumerate(rows):
        assert_parity(actual[row], expected[name][row], without_prefix=base[row], context=(arch, row, name))
    assert not torch.allclose(expected["a"], expected["b"])
    with pytest.raises(ValueError, match="adapter_names"):
        runtime(**inputs)


@pytest.mark.parametrize("arch,exporter", over_exporters(["bert", "llama"], dynamo={"llama"}))
def test_multi_adapter_export_with_different_prefix_lengths(tmp_path, arch, exporter):
    """Prefixes of 3 and 6 tokens share one graph: padded to 6, the padding masked per row, so every row matches
    PyTorch running its adapter alone (the export's own parity check also steps decoders with past per adapter)."""
    task = default_task(arch)
    model = peft_model(arch, name="short")
    torch.manual_seed(2)
    model.add_adapter("long", PTuningV2Config(task_type=task, num_virtual_tokens=2 * N, prefix_init_std=1.0))
    model.eval()
    folder = export(model, tmp_path / "multi", adapters=["short", "long"])
    metadata = json.loads((folder / "ptv2_export.json").read_text())
    assert metadata["num_virtual_tokens"] == 2 * N and metadata["parity"]["ok"]
    assert metadata["num_virtual_tokens_per_adapter"] == {"short": N, "long": 2 * N}
    runtime = RUNTIME[task].from_pretrained(folder)
    inputs = batch(4, 6, **({"left_pad": 2} if task == "CAUSAL_LM" else {"right_pad": 2}), seed=5)
    if task == "CAUSAL_LM":
        inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    rows = ["long", "short", "long", "short"]
    actual = runtime(**inputs, adapter_names=rows).logits
    base = without_prefix(model, **inputs).logits
    for name in ("short", "long"):
        model.set_adapter(name)
        with torch.no_grad():
            expected = model(**inputs).logits
        for row in (i for i, row_name in enumerate(rows) if row_name == name):
            assert_parity(actual[row], expected[row], without_prefix=base[row], context=(arch, row, name))


# ------------------------------------------------------------------------------- folders, inputs, failures
def test_output_folder_is_atomic_and_refused_unless_forced(tmp_path):
    model = peft_model("bert")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty; pass force=True"):
        export(model, out)
    with pytest.raises(FileExistsError, match=r"Refusing to replace .*out: it holds keep.txt, which no export wrote"):
        export(model, out, force=True)  # force replaces only what an export wrote
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "user data"
    (out / "keep.txt").unlink()
    export(model, out)  # an empty folder needs no force
    first = (out / "model.onnx").read_bytes()
    with pytest.raises(ExportValidationError, match="discarded"):
        export(model, out, force=True, atol=-1.0, rtol=0.0)  # impossible tolerance: validation must fail
    assert (out / "model.onnx").read_bytes() == first  # a failed export never touches the old folder
    export(model, out, force=True)  # an earlier export is replaced
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="it holds notes.txt"):
        export(model, out, force=True)  # ...but not once a user's file sits in it
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.onnx").is_file()
    with pytest.raises(ExportValidationError):
        export(model, tmp_path / "fresh", atol=-1.0, rtol=0.0)
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging, backup or lock left


def test_export_from_adapter_folder_copies_tokenizer_and_leaves_model_intact(tmp_path):
    model = peft_model("roberta", "TOKEN_CLS")
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_model("roberta", "TOKEN_CLS").save_pretrained(base_dir)
    (base_dir / "vocab.json").write_text("{}")
    (base_dir / "merges.txt").write_text("#version: 0.2\n")
    model.save_pretrained(adapter_dir)
    folder = export(adapter_dir, tmp_path / "out", base_model=base_dir)
    assert (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    metadata = json.loads((folder / "ptv2_export.json").read_text())
    assert metadata["task"] == "TOKEN_CLS" and metadata["parity"]["ok"]
    inputs = batch(2, 5, right_pad=1)
    with torch.no_grad():
        expected = model(**inputs).logits
    actual = ORTModelForTokenClassification.from_pretrained(folder)(**inputs).logits
    assert_parity(actual, expected, without_prefix=without_prefix(model, **inputs).logits)
    # exporting patched nothing on the model the caller keeps using
    layers = [m for m in model.modules() if type(m).__name__ == "PTuningV2Layer"]
    assert layers and not any("prefix" in vars(layer) for layer in layers)


def test_model_in_training_mode_exports_and_stays_in_training_mode(tmp_path):
    model = peft_model("electra", "TOKEN_CLS")
    model.train()
    folder = export(model, tmp_path / "out")
    assert model.training and all(m.training for m in model.modules())
    assert json.loads((folder / "ptv2_export.json").read_text())["parity"]["ok"]


def test_bad_inputs_get_clear_errors(tmp_path):
    with pytest.raises(TypeError, match="PeftModel"):
        export(tiny_model("bert"), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        export(tmp_path, tmp_path / "b")
    model = peft_model("bert")
    with pytest.raises(ValueError, match="Unknown task"):
        export(model, tmp_path / "c", task="translation")
    with pytest.raises(ValueError, match="does not match"):
        export(model, tmp_path / "d", task="CAUSAL_LM")
    with pytest.raises(ValueError, match="with_past"):
        export(model, tmp_path / "e", with_past=True)
    with pytest.raises(ValueError, match="dtype"):
        export(model, tmp_path / "f", dtype="int8")
    with pytest.raises(ValueError, match="does not match"):
        export(model, tmp_path / "h", task="SEQ_2_SEQ_LM")
    with pytest.raises(ValueError, match="No adapter named"):
        export(model, tmp_path / "g", adapter_name="nope")
    assert not list(tmp_path.iterdir())
