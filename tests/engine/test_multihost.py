"""Multi-host sampling emulated on one machine: two processes on 127.0.0.1, four CPU devices each.

Both processes join one JAX job through :func:`engine.sharding.initialize_distributed` (the coordinator on an
ephemeral loopback port), build the global 8-device mesh, sample the same request and print their tokens as JSON.
They must agree with each other and with a one-process, one-device run. Cross-process collectives on CPU go
through gloo (``jax_cpu_collectives_implementation``, the default in jax 0.10.2).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from engine.sampling import Sampler
from tests.engine.test_sharded import CONFIGS, INDICES, ROOT, SAMPLING, SEEDS, requests
from tests.fakes.dallebart import random_params, tiny_config

TIMEOUT_S = 180

# The error older jax/XLA builds raise when CPU devices of several processes meet in one computation and no CPU
# collectives implementation exists. Only this exact limitation turns the test into a skip.
NO_CPU_COLLECTIVES = "Multiprocess computations aren't implemented on the CPU backend"

WORKER = """
import json, sys
from engine import sharding

process_id, port = int(sys.argv[1]), sys.argv[2]
assert sharding.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

import jax
from engine.sampling import Sampler
from tests.fakes.dallebart import random_params, tiny_config
from tests.engine.test_sharded import CONFIGS, INDICES, SAMPLING, SEEDS, requests

assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
cfg = tiny_config(**CONFIGS["divides"])
params = random_params(cfg, seed=7, std=0.1)
# (data 2 x model 4) over the devices taken alternately from each process, so that every "model" group and every
# "data" group spans both processes: all of the program's collectives (the Megatron all-reduces, the all-gather of
# the tokens) cross the process boundary. One compile instead of one per mesh keeps the test short.
p0, p1 = ([d for d in jax.devices() if d.process_index == p] for p in range(2))
devices = [p0[0], p1[0], p0[1], p1[1], p1[2], p0[2], p1[3], p0[3]]  # rows and columns alternate processes
mesh = sharding.make_mesh(4, devices=devices)
groups = [{d.process_index for d in row} for row in mesh.devices] + [{d.process_index for d in col}
                                                                     for col in mesh.devices.T]
assert all(g == {0, 1} for g in groups)
s = Sampler(None, params, cfg, buckets=(4,), mesh=mesh)
tokens = s.sample(*requests(cfg), SEEDS, INDICES, **SAMPLING).tolist()
print(json.dumps({"process": jax.process_index(), "mesh": dict(mesh.shape), "tokens": tokens}), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_two_processes() -> list[tuple[int, str, str]]:
    """Start both workers, wait (bounded) for both; (returncode, stdout, stderr) per process id."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(var, None)
    port = str(_free_port())
    procs = [
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(WORKER), str(i), port], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=TIMEOUT_S)
            results.append((proc.returncode, out, err))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        tails = [proc.communicate()[1][-2000:] for proc in procs]
        pytest.fail(f"multi-host workers did not finish in {TIMEOUT_S} s; stderr tails: {tails}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def test_two_processes_sample_the_same_tokens_as_one():
    results = _launch_two_processes()
    errors = [err for code, _, err in results if code != 0]
    if errors and any(NO_CPU_COLLECTIVES in err for err in errors):
        pytest.skip(f"this jax cannot run CPU computations across processes: {NO_CPU_COLLECTIVES}")
    assert not errors, "\n---\n".join(err[-3000:] for err in errors)
    outs = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in results]
    assert [o["process"] for o in outs] == [0, 1]

    cfg = tiny_config(**CONFIGS["divides"])
    single = Sampler(None, random_params(cfg, seed=7, std=0.1), cfg, buckets=(4,))
    want = single.sample(*requests(cfg), SEEDS, INDICES, **SAMPLING)
    for o in outs:
        assert o["mesh"] == {"data": 2, "model": 4}
        np.testing.assert_array_equal(np.asarray(o["tokens"]), want, err_msg=f"process {o['process']}")
