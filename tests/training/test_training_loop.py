"""The generic training loop: convergence, logging, checkpoints, exact resume, accumulation, data parallelism."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from training.checkpoint import Checkpointer
from training.loop import ArrayBatches, TrainState, train
from training.metrics_log import MetricsLog, read_metrics
from training.optim import OptimConfig, make_schedule

ROOT = Path(__file__).resolve().parents[2]

# A tiny regression problem shared by the tests and by the subprocess scripts below (which import it).


def make_data(n=256, seed=0):
    r = np.random.default_rng(seed)
    x = r.normal(size=(n, 4)).astype(np.float32)
    w = np.array([[1.0], [-2.0], [0.5], [3.0]], np.float32)
    y = np.tanh(x @ w) + 0.05 * r.normal(size=(n, 1)).astype(np.float32)
    return {"x": x, "y": y}


def init_mlp(seed=0, hidden=16):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {"w1": jax.random.normal(k1, (4, hidden)) * 0.5, "b1": jnp.zeros(hidden),
            "w2": jax.random.normal(k2, (hidden, 1)) * 0.5, "b2": jnp.zeros(1)}


def mse(params, batch, rng):
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    pred = h @ params["w2"] + params["b2"]
    loss = jnp.mean((pred - batch["y"]) ** 2)
    return loss, {"mae": jnp.mean(jnp.abs(pred - batch["y"]))}


SETUP = "import jax, numpy as np\nfrom tests.training.test_training_loop import init_mlp, make_data, mse\n"


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def _run_script(body: str, *, env_extra: dict[str, str] | None = None, timeout: float = 120) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    code = SETUP + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


ADAM = OptimConfig(name="adamw", learning_rate=1e-2, warmup_steps=3)


def test_loss_decreases_and_log_is_well_formed(tmp_path):
    log = tmp_path / "log.jsonl"
    res = train(init_mlp(), mse, ArrayBatches(make_data(), 32, seed=1), steps=60, optim=ADAM, log_path=log,
                progress=False)
    assert int(res.state.step) == 60
    first = np.mean(res.losses[:5])
    last = np.mean(res.losses[-5:])
    assert last < 0.3 * first, (first, last)
    recs = read_metrics(log)
    assert [r["step"] for r in recs] == list(range(1, 61))
    for r in recs:
        for key in ("loss", "lr", "grad_norm", "examples_per_s", "mae", "time"):
            assert isinstance(r[key], float), (key, r)
        assert r["grad_norm"] >= 0 and r["examples_per_s"] > 0
    # warm-up: lr of update k is k/3 * peak for k < 3, then the peak
    assert [round(r["lr"], 6) for r in recs[:5]] == [0.0, round(1e-2 / 3, 6), round(2e-2 / 3, 6), 1e-2, 1e-2]
    assert res.examples_per_s is not None and res.examples_per_s > 0
    for line in log.read_text().splitlines():
        json.loads(line)  # strict JSON, one object per line


def test_schedules_and_config_errors():
    cos = make_schedule(OptimConfig(learning_rate=1.0, warmup_steps=10, decay="cosine", decay_steps=100,
                                    end_lr_ratio=0.1))
    assert float(cos(0)) == 0.0 and float(cos(5)) == pytest.approx(0.5)
    assert float(cos(10)) == pytest.approx(1.0)
    assert float(cos(110)) == pytest.approx(0.1, abs=1e-6)
    lin = make_schedule(OptimConfig(learning_rate=2.0, decay="linear", decay_steps=10))
    assert float(lin(5)) == pytest.approx(1.0) and float(lin(20)) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="name"):
        OptimConfig(name="lamb")
    with pytest.raises(ValueError, match="grad_accum_steps"):
        OptimConfig(grad_accum_steps=0)
    with pytest.raises(ValueError, match="unknown keys"):
        OptimConfig.from_dict({"lr": 1.0})


def test_adafactor_and_clipping_train():
    cfg = OptimConfig(name="adafactor", learning_rate=3e-2, max_grad_norm=1.0)
    res = train(init_mlp(), mse, ArrayBatches(make_data(), 32), steps=40, optim=cfg, progress=False)
    assert np.mean(res.losses[-5:]) < 0.5 * np.mean(res.losses[:5])


def test_array_batches_are_deterministic_and_cover_each_epoch():
    data = {"i": np.arange(100)}
    a, b = ArrayBatches(data, 10, seed=3), ArrayBatches(data, 10, seed=3)
    assert all(np.array_equal(a[k]["i"], b[k]["i"]) for k in (0, 7, 13, 25))
    epoch0 = np.concatenate([a[k]["i"] for k in range(10)])
    assert sorted(epoch0.tolist()) == list(range(100))
    assert not np.array_equal(a[0]["i"], a[10]["i"])  # new permutation next epoch
    assert not np.array_equal(a[0]["i"], ArrayBatches(data, 10, seed=4)[0]["i"])
    with pytest.raises(ValueError, match="differ in length"):
        ArrayBatches({"x": np.zeros(3), "y": np.zeros(4)}, 2)


def test_checkpoints_every_n_keep_last_k(tmp_path):
    res = train(init_mlp(), mse, ArrayBatches(make_data(), 32), steps=20, optim=ADAM, ckpt_dir=tmp_path / "ck",
                save_every=5, keep=2, progress=False)
    ck = Checkpointer(tmp_path / "ck")
    assert ck.all_steps() == [15, 20]
    meta = ck.read_meta()
    assert meta["step"] == 20 and meta["data_position"] == 20 and meta["seed"] == 0
    assert meta["optim"]["learning_rate"] == 1e-2
    state, _ = ck.restore(res.state.as_dict())
    ck.close()
    np.testing.assert_array_equal(_flat(state["params"]), _flat(res.params))
    np.testing.assert_array_equal(_flat(state["opt_state"]), _flat(res.state.opt_state))


def test_stopped_run_resumes_to_the_same_params(tmp_path):
    data = ArrayBatches(make_data(), 32, seed=5)
    full = train(init_mlp(), mse, data, steps=20, optim=ADAM, progress=False)
    kw = dict(steps=20, optim=ADAM, ckpt_dir=tmp_path / "ck", save_every=5, log_path=tmp_path / "log.jsonl",
              progress=False)
    part = train(init_mlp(), mse, data, stop_after=13, **kw)  # steps 11..13 are lost with the "crash"
    assert part.interrupted and int(part.state.step) == 13
    assert len(read_metrics(tmp_path / "log.jsonl")) == 13
    resumed = train(init_mlp(seed=99), mse, data, **kw)  # init is ignored: the checkpoint wins
    assert resumed.resumed_from == 10
    np.testing.assert_array_equal(_flat(resumed.params), _flat(full.params))
    np.testing.assert_array_equal(_flat(resumed.state.opt_state), _flat(full.state.opt_state))
    recs = read_metrics(tmp_path / "log.jsonl")
    assert [r["step"] for r in recs] == list(range(1, 21))  # replayed steps appear once
    np.testing.assert_allclose([r["loss"] for r in recs], full.losses, rtol=0, atol=0)
    with pytest.raises(ValueError, match="seed"):
        train(init_mlp(), mse, data, seed=1, **{**kw, "steps": 25})


KILL_SCRIPT = """
import sys, time
from training.loop import ArrayBatches, train
from training.optim import OptimConfig

class Slow(ArrayBatches):
    def __getitem__(self, k):
        time.sleep(0.05)
        return super().__getitem__(k)

ck, log, out = sys.argv[1:4]
res = train(init_mlp(), mse, Slow(make_data(), 32, seed=5), steps=40,
            optim=OptimConfig(name="adamw", learning_rate=1e-2, warmup_steps=3),
            ckpt_dir=ck, save_every=4, log_path=log, progress=False)
np.save(out, np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(res.params)]))
"""


def test_killed_process_resumes_to_the_same_params(tmp_path):
    ck, log, out = tmp_path / "ck", tmp_path / "log.jsonl", tmp_path / "params.npy"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", SETUP + KILL_SCRIPT, str(ck), str(log), str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    try:
        while time.time() < deadline:
            if log.exists() and len(log.read_text().splitlines()) >= 14:
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert not out.exists(), "the run finished before it could be killed"
    killed_at = len(read_metrics(log))
    assert 14 <= killed_at < 40
    # rerun the same command: it resumes from the last checkpoint and finishes
    subprocess.run(cmd, env=env, check=True, timeout=120, capture_output=True)
    full = train(init_mlp(), mse, ArrayBatches(make_data(), 32, seed=5), steps=40, optim=ADAM, progress=False)
    np.testing.assert_allclose(np.load(out), _flat(full.params), rtol=0, atol=1e-6)
    assert [r["step"] for r in read_metrics(log)] == list(range(1, 41))


@pytest.mark.parametrize("cfg", [OptimConfig(name="sgd", learning_rate=0.1), OptimConfig(learning_rate=1e-2)])
def test_grad_accumulation_matches_one_big_batch(cfg):
    data = ArrayBatches(make_data(), 64, seed=2)
    big = train(init_mlp(), mse, data, steps=3, optim=cfg, progress=False)
    acc_cfg = OptimConfig(**{**cfg.to_dict(), "grad_accum_steps": 2})
    acc = train(init_mlp(), mse, data, steps=3, optim=acc_cfg, progress=False)
    np.testing.assert_allclose(_flat(acc.params), _flat(big.params), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acc.losses, big.losses, rtol=1e-5)
    # and it is not trivially so: half the batch alone gives other params
    half = train(init_mlp(), mse, lambda k: {n: v[::2] for n, v in data[k].items()}, steps=3, optim=cfg,
                 progress=False)
    assert np.max(np.abs(_flat(half.params) - _flat(big.params))) > 1e-4
    with pytest.raises(ValueError, match="divisible"):
        bad = OptimConfig(**{**cfg.to_dict(), "grad_accum_steps": 3})
        train(init_mlp(), mse, data, steps=1, optim=bad, progress=False)


MESH_SCRIPT = """
import json, sys
from jax.sharding import Mesh, PartitionSpec as P
from engine.sharding import make_mesh
from training.loop import ArrayBatches, train
from training.optim import OptimConfig
assert jax.device_count() == 4, jax.devices()
out = {}
data = ArrayBatches(make_data(), 32, seed=7)
cfg = OptimConfig(name="adamw", learning_rate=1e-2, warmup_steps=3)
dp = train(init_mlp(), mse, data, steps=12, optim=cfg, mesh=make_mesh(), progress=False)
out["dp"] = dp.losses
assert dp.params["w1"].sharding.is_fully_replicated
acc = train(init_mlp(), mse, data, steps=12, optim=OptimConfig(**{**cfg.to_dict(), "grad_accum_steps": 2}),
            mesh=make_mesh(), progress=False)
out["dp_accum"] = acc.losses
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
specs = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()}
ck = sys.argv[1]
part = train(init_mlp(), mse, data, steps=12, optim=cfg, mesh=mesh, param_specs=specs, ckpt_dir=ck,
             save_every=4, stop_after=6, progress=False)
tp = train(init_mlp(), mse, data, steps=12, optim=cfg, mesh=mesh, param_specs=specs, ckpt_dir=ck,
           save_every=4, progress=False)
assert tp.resumed_from == 4
assert tp.params["w1"].sharding.spec == P(None, "model"), tp.params["w1"].sharding
assert not tp.params["w1"].sharding.is_fully_replicated
out["tp"] = part.losses[:4] + tp.losses
out["params"] = {k: np.asarray(v).tolist() for k, v in dp.params.items()}
print("RESULT" + json.dumps(out))
"""


def test_data_parallel_on_4_cpu_devices_matches_one_device(tmp_path):
    stdout = _run_script(
        MESH_SCRIPT.replace("sys.argv[1]", repr(str(tmp_path / "ck"))),
        env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"},
    )
    out = json.loads(stdout.split("RESULT", 1)[1])
    data = ArrayBatches(make_data(), 32, seed=7)
    ref = train(init_mlp(), mse, data, steps=12, optim=ADAM, progress=False)
    np.testing.assert_allclose(out["dp"], ref.losses, rtol=1e-5)
    np.testing.assert_allclose(out["dp_accum"], ref.losses, rtol=1e-5)
    np.testing.assert_allclose(out["tp"], ref.losses, rtol=1e-5)
    for k, v in out["params"].items():
        np.testing.assert_allclose(np.asarray(v), np.asarray(ref.params[k]), rtol=1e-5, atol=1e-6)


def test_metrics_log_rewind_drops_replayed_and_torn_lines(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    for k in range(1, 6):
        log.write({"step": k, "loss": np.float32(1.0 / k), "bad": float("nan")})
    with open(tmp_path / "m.jsonl", "a") as fh:
        fh.write('{"step": 6, "lo')  # a write torn by a kill
    assert log.rewind(3) == 3
    recs = read_metrics(tmp_path / "m.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3] and recs[0]["bad"] == "nan"
    with pytest.raises(ValueError, match="step"):
        log.write({"loss": 1.0})


def test_continuing_from_a_train_state_and_bad_loss_fn():
    data = ArrayBatches(make_data(), 32, seed=3)
    straight = train(init_mlp(), mse, data, steps=10, optim=ADAM, progress=False)
    first = train(init_mlp(), mse, data, steps=5, optim=ADAM, progress=False)
    assert isinstance(first.state, TrainState)
    second = train(first.state, mse, data, steps=10, optim=ADAM, progress=False)
    np.testing.assert_array_equal(_flat(second.params), _flat(straight.params))
    with pytest.raises(TypeError, match="loss_fn"):
        train(init_mlp(), lambda p, b, r: (1.0, 2.0, 3.0), data, steps=1, optim=ADAM, progress=False)


def _mse_with_side_output(params, batch, rng):
    loss, aux = mse(params, batch, rng)
    return loss, {**aux, "_rows": batch["x"][:, 0]}


def _count_rows(params, extra, aux, step, rng):
    # untrained state updated inside the step from a side output; also nudges a param deterministically
    extra = {"seen": extra["seen"] + aux["_rows"].shape[0], "last_row_sum": jnp.sum(aux["_rows"])}
    return {**params, "b2": params["b2"] * 0.5}, extra


def test_extra_state_is_updated_in_step_and_survives_resume(tmp_path):
    data = ArrayBatches(make_data(), 32, seed=4)
    kw = dict(steps=8, optim=OptimConfig(learning_rate=1e-2, grad_accum_steps=2), progress=False,
              extra_init={"seen": jnp.zeros((), jnp.int32), "last_row_sum": jnp.zeros(())},
              extra_update=_count_rows)
    full = train(init_mlp(), _mse_with_side_output, data, **kw)
    assert int(full.state.extra["seen"]) == 8 * 16  # last micro-batch of each of the 8 steps
    x_last = data[7]["x"][:, 0]
    np.testing.assert_allclose(float(full.state.extra["last_row_sum"]), np.sum(x_last[1::2]), rtol=1e-5)
    assert all(not k.startswith("_") for r in full.history for k in r)
    ck = dict(ckpt_dir=tmp_path / "ck", save_every=3)
    train(init_mlp(), _mse_with_side_output, data, stop_after=5, **kw, **ck)
    resumed = train(init_mlp(), _mse_with_side_output, data, **kw, **ck)
    assert resumed.resumed_from == 3
    np.testing.assert_array_equal(_flat(resumed.state.extra), _flat(full.state.extra))
    np.testing.assert_array_equal(_flat(resumed.params), _flat(full.params))
