"""Checkpoints: saved at one layout, loaded at another with the same parameters and the same next
losses; written atomically; refused when corrupted, truncated, incomplete or tampered with, before
anything in them is unpickled."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from distributed import mesh_for
from meshattn import ModelConfig, ParallelConfig, TrainConfig, Transformer
from meshattn.training import checkpoint as ckpt
from meshattn.training.corpus import Corpus
from meshattn.parallel import gather_state_dict
from meshattn.training.step import build_model, make_optimizer, train_step
from parity import assert_close

MODEL = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=64, vocab_size=256, max_seq_len=32,
                    norm="rmsnorm", position="rope", activation="swiglu")
LAYOUTS = {
    "dp2xtp2": ParallelConfig(dp=2, tp=2),
    "tp1": ParallelConfig(tp=1),
    "tp2": ParallelConfig(tp=2),
    "cp2": ParallelConfig(cp=2, cp_impl="ring"),
    "cp4": ParallelConfig(cp=4, cp_impl="ring"),
    "dp4": ParallelConfig(dp=4),
    "tp4": ParallelConfig(tp=4),  # 2 KV heads replicated on 2 ranks each
    # parameters, gradients and optimizer state sharded over dp x cp by FSDP (--shard dp)
    "dp2xtp2-sharded": ParallelConfig(dp=2, tp=2, shard="dp"),
    "dp2xcp2-sharded": ParallelConfig(dp=2, cp=2, cp_impl="ring", shard="dp"),
    "dp4-sharded": ParallelConfig(dp=4, shard="dp"),
}


def _cfg(layout: str, out: str) -> TrainConfig:
    return TrainConfig(model=MODEL, parallel=LAYOUTS[layout], steps=8, batch_size=4, seq_len=32, lr=3e-3, warmup=2,
                       sample_tokens=0, out=out)


def _corpus() -> Corpus:
    return Corpus.from_path(None, max_bytes=1 << 16)


def save_then_continue(rank, world, layout, root, steps_before=3, steps_after=2):
    """Train `steps_before` steps, save, then go on: the losses a resumed run must reproduce."""
    cfg = _cfg(layout, root)
    corpus = _corpus()
    model = build_model(cfg, mesh_for(cfg.parallel))
    opt = make_optimizer(model, cfg)
    for step in range(steps_before):
        train_step(model, opt, corpus, step, cfg)
    ckpt.save(model, opt, cfg, steps_before, Path(root))
    full = {k: v.clone() for k, v in ckpt._state(model, opt).items()}  # weights and AdamW moments, full shape
    losses = [train_step(model, opt, corpus, s, cfg)[0] for s in range(steps_before, steps_before + steps_after)]
    return full, losses


def load_and_continue(rank, world, layout, root, full, steps_before=3, steps_after=2):
    cfg = _cfg(layout, root)
    corpus = _corpus()
    model = build_model(cfg, mesh_for(cfg.parallel))
    opt = make_optimizer(model, cfg)
    meta = ckpt.load(model, opt, cfg, Path(root))
    assert meta["step"] == steps_before
    loaded = ckpt._state(model, opt)
    assert loaded.keys() == full.keys()
    for name, t in full.items():
        assert torch.equal(loaded[name], t), f"{name} differs after loading"  # bitwise, moments included
    return [train_step(model, opt, corpus, s, cfg)[0] for s in range(steps_before, steps_before + steps_after)]


@pytest.mark.parametrize("saved,loaded", [("dp2xtp2", "tp1"), ("tp2", "cp2"), ("cp4", "dp4"), ("tp1", "tp4"),
                                          ("dp2xtp2", "dp2xtp2"),
                                          # sharded to unsharded at another layout, and back; sharded to sharded
                                          ("dp2xtp2-sharded", "cp2"), ("tp4", "dp2xcp2-sharded"),
                                          ("dp2xcp2-sharded", "dp4-sharded")])
def test_save_at_one_layout_load_at_another(pools, tmp_path, saved, loaded):
    world = LAYOUTS[saved].world_size
    full, losses = pools.run(world, save_then_continue, layout=saved, root=str(tmp_path))[0]
    resumed = pools.run(LAYOUTS[loaded].world_size, load_and_continue, layout=loaded, root=str(tmp_path),
                        full=full)[0]
    if saved == loaded:
        assert resumed == losses  # same layout: bitwise the same continuation
    else:  # another layout sums in another order: fp32 rounding, amplified a little by Adam
        assert_close(torch.tensor(resumed), torch.tensor(losses), "losses after resuming", rtol=1e-5)


def crash_during_save(rank, world, root):
    """Step 2 saved; the save of step 4 dies after DCP wrote its files, before the manifest."""
    cfg = _cfg("tp2", root)
    corpus = _corpus()
    model = build_model(cfg, mesh_for(cfg.parallel))
    opt = make_optimizer(model, cfg)
    for step in range(2):
        train_step(model, opt, corpus, step, cfg)
    ckpt.save(model, opt, cfg, 2, Path(root))
    full = {k: v.clone() for k, v in gather_state_dict(model).items()}
    for step in range(2, 4):
        train_step(model, opt, corpus, step, cfg)
    original = ckpt.write_manifest

    def die(directory):
        raise SystemError("killed while saving")

    ckpt.write_manifest = die
    try:
        ckpt.save(model, opt, cfg, 4, Path(root))  # rank 0 dies in it; rank 1 finishes its part
    except SystemError:
        torch.distributed.barrier()  # stands in for the save's last barrier, which rank 0 skipped
        assert (Path(root) / ".step-00000004.partial").is_dir()  # the half-written one stays aside
    finally:
        ckpt.write_manifest = original
    model2 = build_model(cfg, mesh_for(cfg.parallel))
    meta = ckpt.load(model2, make_optimizer(model2, cfg), cfg, Path(root))
    loaded = gather_state_dict(model2)
    return meta["step"] == 2 and all(torch.equal(loaded[k], v) for k, v in full.items())


def test_a_crash_during_save_leaves_the_previous_checkpoint_usable(pools, tmp_path):
    assert pools.run(2, crash_during_save, root=str(tmp_path)) == [True, True]


def save_small(rank, world, root):
    cfg = _cfg("tp2", root)
    model = build_model(cfg, mesh_for(cfg.parallel))
    opt = make_optimizer(model, cfg)
    train_step(model, opt, _corpus(), 0, cfg)
    return str(ckpt.save(model, opt, cfg, 1, Path(root)))


@pytest.fixture(scope="module")
def saved_checkpoint(pools, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return Path(pools.run(2, save_small, root=str(root))[0])


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _shard(path: Path) -> Path:
    return sorted(path.glob("*.distcp"))[0]


def test_an_intact_checkpoint_loads_in_one_process(saved_checkpoint):
    state, meta = ckpt.load_reference(saved_checkpoint.parent)  # via `latest`
    assert meta["step"] == 1
    ref = Transformer(MODEL).state_dict()
    assert state.keys() == ref.keys() and all(state[k].shape == ref[k].shape for k in ref)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "extra"])
def test_damaged_checkpoints_are_refused_naming_the_file(saved_checkpoint, tmp_path, damage):
    path = _copy(saved_checkpoint, tmp_path / "c")
    shard = _shard(path)
    if damage == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
        expect = rf"{shard.name}: SHA-256 differs"
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
        expect = rf"{shard.name}: \d+ bytes, the manifest says"
    elif damage == "delete":
        shard.unlink()
        expect = rf"\['{shard.name}'\] listed in the manifest are missing"
    else:
        (path / "stray.pt").write_bytes(b"x")
        expect = r"\['stray.pt'\] are not in the manifest"
    with pytest.raises(ckpt.CheckpointError, match=expect):
        ckpt.load_reference(path)


class _Exploit:
    def __reduce__(self):
        return (open, ("/tmp/meshattn-unpickled-marker", "w"))


def test_a_tampered_metadata_file_is_never_unpickled(saved_checkpoint, tmp_path):
    marker = Path("/tmp/meshattn-unpickled-marker")
    marker.unlink(missing_ok=True)
    path = _copy(saved_checkpoint, tmp_path / "c")
    (path / ".metadata").write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(ckpt.CheckpointError, match=r"\.metadata: (SHA-256 differs|\d+ bytes)"):
        ckpt.load_reference(path)
    assert not marker.exists(), "the tampered metadata was unpickled"
    # The same file is executable when unpickled: the check is what stops it.
    pickle.loads((path / ".metadata").read_bytes()).close()
    assert marker.exists()
    marker.unlink()


def test_a_checkpoint_without_manifest_is_refused(saved_checkpoint, tmp_path):
    path = _copy(saved_checkpoint, tmp_path / "c")
    (path / "manifest.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="no manifest.json"):
        ckpt.load_reference(path)


def test_a_checkpoint_of_another_model_is_refused(saved_checkpoint, tmp_path):
    path = _copy(saved_checkpoint, tmp_path / "c")
    meta = json.loads((path / "meta.json").read_text())
    assert meta["config"]["model"]["d_model"] == 32
    other = _cfg("tp2", str(tmp_path))
    other = TrainConfig(model=ModelConfig(**{**meta["config"]["model"], "d_ff": 128}), parallel=other.parallel,
                        batch_size=4, seq_len=32)
    with pytest.raises(Exception, match=r"d_ff \(64 saved vs 128 now\)"):
        ckpt._check_model(meta, other)
