"""DDP training of a P-Tuning v2 adapter with the HF Trainer under torchrun: 2 CPU processes, gloo backend.

The file is also the worker: torchrun runs it as a script (``python -m torch.distributed.run ... tests/test_ddp.py``).
Each rank starts from a different prefix init and sees different batches, so identical final weights on both ranks
prove that DDP broadcast the start state and averaged the gradients of the prefix and the task head.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from tests.child_process import run_python

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 4


def _worker(out_dir: Path, checkpointing: str) -> None:
    import torch.distributed as dist
    from transformers import Trainer

    import ptv2_plugin  # noqa: F401
    from ptv2_plugin.transformers_compat import checkpointing_arguments
    from tests.test_trainer import ToyDataset, peft_model, trainable_state, training_args

    rank = int(os.environ["RANK"])
    model = peft_model("bert", prefix_seed=100 + rank)
    args = training_args(
        out_dir / "run",
        max_steps=MAX_STEPS,
        per_device_train_batch_size=4,
        ddp_backend="gloo",
        **checkpointing_arguments(checkpointing != "off", use_reentrant=checkpointing == "reentrant"),
        ddp_find_unused_parameters=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ToyDataset(64))
    assert trainer.args.world_size == 2 and dist.get_backend() == "gloo", (trainer.args.world_size, dist.get_backend())
    trainer.train()
    assert trainer.state.global_step == MAX_STEPS
    torch.save(trainable_state(model), out_dir / f"rank{rank}.pt")
    trainer.save_model(str(out_dir / "adapter"))  # writes on the main process only
    # Tear the process group down while the interpreter is alive: left to interpreter exit, gloo's worker threads
    # can abort the process ("terminate called without an active exception", pytorch/pytorch#190489), which once
    # failed this test after training had finished.
    dist.barrier()
    dist.destroy_process_group()


def _launch(tmp_path: Path, checkpointing: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    run_python(module="torch.distributed.run", timeout=300, env=env,
               args=["--standalone", "--nproc_per_node=2", str(Path(__file__).resolve()), str(tmp_path), checkpointing])


def _check_ranks_agree_and_adapter_loads(tmp_path: Path) -> None:
    from peft import PeftModel

    from tests.test_trainer import assert_states_equal, peft_model, trainable_state
    from tests.tiny_models import sample_inputs, tiny_model

    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    assert_states_equal(rank1, rank0)
    untrained = trainable_state(peft_model("bert", prefix_seed=100))
    assert all(not torch.equal(rank0[k], untrained[k]) for k in rank0), "DDP training left a parameter unchanged"

    loaded = PeftModel.from_pretrained(tiny_model("bert", "SEQ_CLS"), tmp_path / "adapter")
    loaded_state = {k: p.detach() for k, p in loaded.named_parameters() if k in rank0}
    assert_states_equal(loaded_state, rank0)
    reference = peft_model("bert")
    reference.load_state_dict(rank0, strict=False)
    inputs = sample_inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, reference.eval()(**inputs).logits)


# "reentrant" is the transformers 4.57 default; the plugin runs it non-reentrant under DDP (otherwise the ranks drift).
@pytest.mark.parametrize("checkpointing", ["off", "reentrant"])
def test_ddp_two_cpu_processes_end_with_identical_prefix(tmp_path, checkpointing):
    _launch(tmp_path, checkpointing)
    _check_ranks_agree_and_adapter_loads(tmp_path)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker(Path(sys.argv[1]), checkpointing=sys.argv[2])
