"""Encoder-decoder (T5, BART) ONNX export: Optimum's seq2seq files, prefixes in all three attention locations frozen
into the graphs, PyTorch vs ONNX Runtime (CPU) parity, generate(), the CLI and Optimum interop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from peft import get_peft_model  # noqa: E402

from exporters.cli import main  # noqa: E402
from exporters.onnx import (  # noqa: E402
    DECODER_FILE_NAME,
    DECODER_WITH_PAST_FILE_NAME,
    ENCODER_FILE_NAME,
    ORTModelForCausalLM,
    ORTModelForSeq2SeqLM,
    export,
    load,
)
from exporters.onnx.caches import flatten_cache  # noqa: E402
from exporters.onnx.seq2seq import slot_locations  # noqa: E402
from ptv2_plugin import PTuningV2Config  # noqa: E402
from ptv2_plugin.architectures import CROSS_ATTENTION, DECODER_SELF_ATTENTION, ENCODER_SELF_ATTENTION  # noqa: E402
from ptv2_plugin.transformers_compat import cache_from_output, cache_kwargs  # noqa: E402
from tests.parity import assert_parity  # noqa: E402
from tests.tiny_models import SEQ2SEQ, VOCAB, tiny_model  # noqa: E402

N = 3
FILES = (ENCODER_FILE_NAME, DECODER_FILE_NAME, DECODER_WITH_PAST_FILE_NAME)
TASK = "SEQ_2_SEQ_LM"


def peft_model(arch: str, *, seed: int = 0, name: str = "default", **config):
    torch.manual_seed(seed)
    config = PTuningV2Config(task_type=TASK, num_virtual_tokens=N, prefix_init_std=1.0, **config)
    return get_peft_model(tiny_model(arch, TASK), config, adapter_name=name).eval()


def encoder_batch(batch: int, length: int, pad: int = 0, seed: int = 0) -> dict:
    """Encoder inputs; the last row is right-padded by ``pad`` tokens (pad id under the mask, as a tokenizer does)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    if batch > 1 and pad:
        mask[-1, length - pad :] = 0
    return {"input_ids": ids, "attention_mask": mask}


_EXPORTS: dict = {}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """arch -> (PeftModel, folder, ORTModelForSeq2SeqLM); one validated export per architecture for the module."""

    def get(arch: str):
        if arch not in _EXPORTS:
            model = peft_model(arch)
            folder = export(model, tmp_path_factory.mktemp(arch) / "onnx")
            _EXPORTS[arch] = (model, folder, ORTModelForSeq2SeqLM.from_pretrained(folder))
        return _EXPORTS[arch]

    yield get
    _EXPORTS.clear()


# ----------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("arch", SEQ2SEQ)
def test_parity_several_shapes_with_padded_encoder_rows(exported, arch):
    model, folder, runtime = exported(arch)
    for batch, length, pad, decoder_length in [(1, 1, 0, 1), (2, 6, 2, 3), (4, 9, 5, 5)]:
        inputs = encoder_batch(batch, length, pad, seed=batch)
        decoder_ids = torch.randint(3, VOCAB, (batch, decoder_length), generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            reference = model(**inputs, decoder_input_ids=decoder_ids)
            with model.disable_adapter():
                base = model(**inputs, decoder_input_ids=decoder_ids)
        actual = runtime(**inputs, decoder_input_ids=decoder_ids)
        encoded = runtime.encode(**inputs).last_hidden_state
        # the prefix moves both outputs by far more than parity allows, so parity proves it is in the graphs
        assert_parity(actual.logits, reference.logits, without_prefix=base.logits, context=(arch, batch))
        assert_parity(encoded, reference.encoder_last_hidden_state, without_prefix=base.encoder_last_hidden_state,
                      context=(arch, batch))
    parity = json.loads((folder / "ptv2_export.json").read_text())["parity"]
    assert parity["ok"] and parity["cases"] >= 10


@pytest.mark.parametrize("arch", SEQ2SEQ)
def test_decoder_steps_from_empty_past_and_caches_hold_real_tokens_only(exported, arch):
    model, _, runtime = exported(arch)
    inputs = encoder_batch(3, 7, pad=3, seed=5)
    start = torch.full((3, 1), model.config.decoder_start_token_id)
    with torch.no_grad():
        reference = model(**inputs, decoder_input_ids=start, use_cache=True)
        with model.disable_adapter():
            base = model(**inputs, decoder_input_ids=start, use_cache=True)
    actual = runtime(**inputs, decoder_input_ids=start)
    encoder_outputs, base_encoder_outputs = (reference.encoder_last_hidden_state,), (base.encoder_last_hidden_state,)
    for step in range(4):
        assert_parity(actual.logits, reference.logits, without_prefix=base.logits, context=(arch, step))
        # self-attention cache: exactly the decoder tokens so far; cross-attention cache: the encoder's real tokens
        assert len(cache_from_output(actual)) == 2  # decoder layers
        for layer in cache_from_output(actual):
            assert layer[0].shape[2] == layer[1].shape[2] == step + 1
            assert layer[2].shape[2] == layer[3].shape[2] == 7
        expected = flatten_cache(cache_from_output(reference))
        got = [t for layer in cache_from_output(actual) for t in layer]
        for index, (e, g) in enumerate(zip(expected, got)):
            assert_parity(g, e, context=(arch, step, "cache", index))
        token = torch.randint(3, VOCAB, (3, 1), generator=torch.Generator().manual_seed(step))
        with torch.no_grad():
            reference = model(encoder_outputs=encoder_outputs, attention_mask=inputs["attention_mask"],
                              decoder_input_ids=token, **cache_kwargs(cache_from_output(reference)), use_cache=True)
            with model.disable_adapter():
                base = model(encoder_outputs=base_encoder_outputs, attention_mask=inputs["attention_mask"],
                             decoder_input_ids=token, **cache_kwargs(cache_from_output(base)), use_cache=True)
        actual = runtime(encoder_outputs=actual.encoder_last_hidden_state, attention_mask=inputs["attention_mask"],
                         decoder_input_ids=token, **cache_kwargs(cache_from_output(actual)))


@pytest.mark.parametrize("arch", SEQ2SEQ)
def test_generate_gives_identical_tokens(exported, arch):
    model, _, runtime = exported(arch)
    inputs = encoder_batch(3, 6, pad=2, seed=7)
    with torch.no_grad():
        free = model.generate(**inputs, max_new_tokens=7, min_new_tokens=7, do_sample=False)
    assert free.shape == (3, 8)
    assert runtime.generate(**inputs, max_new_tokens=7, min_new_tokens=7, do_sample=False).tolist() == free.tolist()
    # a token row 0 really produces becomes EOS: row 0 stops there and is padded while the others go on
    eos = int(free[0, 3])
    kwargs = dict(max_new_tokens=7, do_sample=False, eos_token_id=eos, pad_token_id=model.config.pad_token_id)
    with torch.no_grad():
        expected = model.generate(**inputs, **kwargs)
    assert runtime.generate(**inputs, **kwargs).tolist() == expected.tolist()
    # generation-config processors that transformers applies to greedy search
    kwargs = dict(max_new_tokens=6, do_sample=False, no_repeat_ngram_size=2, repetition_penalty=1.5,
                  forced_bos_token_id=5, forced_eos_token_id=7)
    with torch.no_grad():
        expected = model.generate(**inputs, **kwargs)
    assert runtime.generate(**inputs, **kwargs).tolist() == expected.tolist()
    # the IOBinding path (CUDA's: caches stay OrtValues between steps), exercised on CPU
    bound = ORTModelForSeq2SeqLM.from_pretrained(runtime.model_dir, use_io_binding=True)
    assert bound.generate(**inputs, max_new_tokens=7, min_new_tokens=7).tolist() == free.tolist()
    sampled = dict(max_new_tokens=5, do_sample=True, top_k=20, temperature=0.8)
    first = runtime.generate(**inputs, generator=torch.Generator().manual_seed(3), **sampled)
    assert torch.equal(first, runtime.generate(**inputs, generator=torch.Generator().manual_seed(3), **sampled))


# ------------------------------------------------------------------------------------------- graph contents
@pytest.mark.parametrize("arch", SEQ2SEQ)
def test_prefix_initializers_per_graph_no_prefix_input_no_mlp(exported, arch):
    model, folder, _ = exported(arch)
    assert {p.name for p in folder.iterdir()} >= {*FILES, "config.json", "generation_config.json", "ptv2_export.json"}
    prefix = model.base_model.prefix_encoder().all_key_values()
    locations = slot_locations(model.base_model.model, "default")
    assert sorted(locations) == list(range(len(prefix)))
    assert {where: sum(w == where for w in locations.values()) for where in set(locations.values())} == {
        ENCODER_SELF_ATTENTION: 2, DECODER_SELF_ATTENTION: 2, CROSS_ATTENTION: 2}
    past = [f"past_key_values.{i}.{a}.{k}" for i in range(2) for a in ("decoder", "encoder") for k in ("key", "value")]
    present = [p.replace("past_key_values", "present") for p in past]
    expected_io = {
        ENCODER_FILE_NAME: (["input_ids", "attention_mask"], ["last_hidden_state"]),
        DECODER_FILE_NAME: (["input_ids", "encoder_attention_mask", "encoder_hidden_states"], ["logits", *present]),
        DECODER_WITH_PAST_FILE_NAME: (["input_ids", "encoder_attention_mask", *past],
                                      ["logits", *[p for p in present if ".decoder." in p]]),
    }
    encoder_params = [p.detach().numpy() for p in model.base_model.prefix_encoder().parameters() if p.ndim == 2]
    assert len(encoder_params) == 3  # P, and the MLP's two weight matrices
    seen: dict[str, set[int]] = {}
    for file_name in FILES:
        graph = onnx.load(str(folder / file_name)).graph
        assert ([i.name for i in graph.input], [o.name for o in graph.output]) == expected_io[file_name]
        initializers = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
        slots = {int(name.split(".")[2]) for name in initializers if name.startswith("ptv2.prefix.")}
        seen[file_name] = slots
        for slot in slots:
            key, value = prefix[slot]
            np.testing.assert_array_equal(initializers[f"ptv2.prefix.{slot}.key"], key.numpy())
            np.testing.assert_array_equal(initializers[f"ptv2.prefix.{slot}.value"], value.numpy())
        assert not any("prefix_encoder" in name for name in initializers)
        for name, array in initializers.items():
            for param in encoder_params:
                for candidate in (param, param.T):
                    assert not (array.shape == candidate.shape and np.allclose(array, candidate)), (file_name, name)
    # every slot is in the graph that runs its attention: encoder self-attention in the encoder, the rest in both
    # decoders (the cross-attention prefix is applied at every step, it is not in the cross-attention cache)
    assert seen[ENCODER_FILE_NAME] == {s for s, w in locations.items() if w == ENCODER_SELF_ATTENTION}
    decoder_slots = {s for s, w in locations.items() if w != ENCODER_SELF_ATTENTION}
    assert seen[DECODER_FILE_NAME] == seen[DECODER_WITH_PAST_FILE_NAME] == decoder_slots
    metadata = json.loads((folder / "ptv2_export.json").read_text())
    assert metadata["task"] == TASK and metadata["optimum_task"] == "text2text-generation-with-past"
    assert {name: set(f["prefix_slots"]) for name, f in metadata["files"].items()} == seen


# ---------------------------------------------------------------------------------------------- variants
def test_no_cross_attention_prefix_and_no_past_export(tmp_path):
    model = peft_model("bart", prefix_cross_attention=False)
    folder = export(model, tmp_path / "nopast", with_past=False)
    assert not (folder / DECODER_WITH_PAST_FILE_NAME).exists()
    decoder = onnx.load(str(folder / DECODER_FILE_NAME)).graph
    locations = slot_locations(model.base_model.model, "default")
    slots = {int(t.name.split(".")[2]) for t in decoder.initializer if t.name.startswith("ptv2.prefix.")}
    assert slots == {s for s, w in locations.items() if w == DECODER_SELF_ATTENTION} and len(slots) == 2
    runtime = load(folder)
    assert isinstance(runtime, ORTModelForSeq2SeqLM) and not runtime.can_use_cache
    inputs = encoder_batch(2, 5, pad=1, seed=2)
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with torch.no_grad():
        expected = model.generate(**inputs, **kwargs)
    assert runtime.generate(**inputs, **kwargs).tolist() == expected.tolist()
    first = runtime(**inputs, decoder_input_ids=expected[:, :1])
    with pytest.raises(ValueError, match="without decoder_with_past_model.onnx"):
        runtime(**inputs, decoder_input_ids=expected[:, 1:2], **cache_kwargs(cache_from_output(first)))


def test_multi_adapter_seq2seq_export_selects_prefix_per_row(tmp_path):
    model = peft_model("bart", name="a")
    torch.manual_seed(1)
    model.add_adapter("b", PTuningV2Config(task_type=TASK, num_virtual_tokens=N, prefix_init_std=1.0))
    model.eval()
    folder = export(model, tmp_path / "multi", adapters=["a", "b"], validate=False)  # checked here, row by row
    runtime = ORTModelForSeq2SeqLM.from_pretrained(folder)
    inputs = encoder_batch(3, 5, pad=2, seed=4)
    decoder_ids = torch.randint(3, VOCAB, (3, 3), generator=torch.Generator().manual_seed(1))
    rows = ["b", "a", "b"]
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    actual = runtime.generate(**inputs, adapter_names=rows, **kwargs)
    logits = runtime(**inputs, decoder_input_ids=decoder_ids, adapter_names=rows).logits
    with torch.no_grad(), model.disable_adapter():
        base = model(**inputs, decoder_input_ids=decoder_ids).logits
    for name in ("a", "b"):
        model.set_adapter(name)
        with torch.no_grad():
            expected = model.generate(**inputs, **kwargs)
            reference = model(**inputs, decoder_input_ids=decoder_ids).logits
        for row in [i for i, r in enumerate(rows) if r == name]:
            assert actual[row].tolist() == expected[row].tolist(), (name, row)
            assert_parity(logits[row], reference[row], without_prefix=base[row], context=(name, row))
    with pytest.raises(ValueError, match="adapter_names"):
        runtime.generate(**inputs, max_new_tokens=2)


def test_errors_name_the_problem(exported, tmp_path):
    model, folder, runtime = exported("bart")
    with pytest.raises(ValueError, match="does not match"):
        export(model, tmp_path / "a", task="CAUSAL_LM")
    with pytest.raises(ValueError, match="decoder_input_ids"):
        runtime(**encoder_batch(1, 3))
    with pytest.raises(ValueError, match="SEQ_2_SEQ_LM export"):
        ORTModelForCausalLM.from_pretrained(folder, file_name=DECODER_FILE_NAME)
    with pytest.raises(FileNotFoundError, match="encoder_model.onnx"):
        ORTModelForSeq2SeqLM.from_pretrained(tmp_path)
    with pytest.raises(NotImplementedError, match="Beam search"):
        runtime.generate(**encoder_batch(1, 3), num_beams=2)
    with pytest.raises(ValueError, match="single adapter"):
        runtime.generate(**encoder_batch(1, 3), adapter_ids=[0], max_new_tokens=1)
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------- CLI
def test_cli_exports_seq2seq_with_auto_detected_task(tmp_path, capsys):
    arch = SEQ2SEQ[0]
    model = peft_model(arch)
    tiny_model(arch, TASK).save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out"
    assert main(["--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--output", str(out)]) == 0
    report = capsys.readouterr().out
    assert "Wrote decoder_with_past_model.onnx" in report and "-> OK" in report
    metadata = json.loads((out / "ptv2_export.json").read_text())
    assert metadata["task"] == TASK and metadata["parity"]["ok"] and all((out / f).is_file() for f in FILES)
    inputs = encoder_batch(2, 5, pad=2, seed=1)
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert load(out).generate(**inputs, max_new_tokens=4, min_new_tokens=4).tolist() == expected.tolist()


# ------------------------------------------------------------------------------------------- Optimum interop
def test_optimum_loads_the_bart_export_and_generates_the_same_tokens(exported):
    try:
        import optimum.onnxruntime as optimum_ort
    except ImportError as error:
        pytest.skip(f"optimum-onnx is not installed in this lane (it needs transformers < 4.58): {error}")
    model, folder, _ = exported("bart")
    runtime = optimum_ort.ORTModelForSeq2SeqLM.from_pretrained(folder, use_merged=False)
    assert runtime.decoder_with_past is not None and runtime.can_use_cache
    inputs = encoder_batch(3, 6, pad=2, seed=8)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    decoder_ids = torch.randint(3, VOCAB, (3, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model.generate(**inputs, **kwargs)
        reference = model(**inputs, decoder_input_ids=decoder_ids).logits
    assert runtime.generate(**inputs, **kwargs).tolist() == expected.tolist()
    assert_parity(runtime(**inputs, decoder_input_ids=decoder_ids).logits, reference)
