"""A generic, resumable, data-parallel training loop.

Contract with the caller:

* ``loss_fn(params, batch, rng) -> loss`` or ``(loss, metrics)`` — a scalar mean loss over the batch and an
  optional dict of scalar metrics (logged next to the loss).
* ``batches[k]`` (or ``batches(k)``) is batch ``k``: a pytree of host arrays whose leading axis is the batch,
  a pure function of the source's seed and ``k``. Update ``k`` consumes exactly batch ``k``, so the data
  position is the step, and a resumed run sees the same data in the same order.
* The per-step random key is ``fold_in(base_key, step)`` (and ``fold_in(., micro_step)`` under gradient
  accumulation): a pure function of the seed and the step, so resume needs no key bookkeeping.

With a mesh, the batch is sharded over its ``"data"`` axis and the params are replicated, or placed by the
given partition specs; the jitted step keeps every array where it is (``in_shardings == out_shardings``) and
XLA inserts the gradient all-reduce. Gradient accumulation splits a batch into ``grad_accum_steps``
interleaved micro-batches (row ``r`` goes to micro-batch ``r % A``, so each device keeps its rows) inside one
jitted step with ``lax.scan``.
"""

from __future__ import annotations

import math
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from training.checkpoint import Checkpointer
from training.metrics_log import MetricsLog
from training.optim import OptimConfig, make_optimizer, make_schedule

Batch = Any
Params = Any
LossFn = Callable[[Params, Batch, jax.Array], Any]
# (params, extra, aux, step, rng) -> (params, extra): runs inside the jitted step, after the optimiser update
ExtraUpdate = Callable[[Params, Any, dict[str, jax.Array], jax.Array, jax.Array], tuple[Params, Any]]


class BatchSource(Protocol):
    """Indexable batch source: ``source[k]`` is batch ``k`` (deterministic)."""

    def __getitem__(self, k: int) -> Batch: ...


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes. ``rng`` is the base key; step keys are derived from it.

    ``extra`` is state that is not trained by gradient but must survive a resume (e.g. codebook usage
    statistics); it is ``None`` unless the trainer passes ``extra_init``.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    extra: Any = None

    def as_dict(self) -> dict[str, Any]:
        d = {"step": self.step, "params": self.params, "opt_state": self.opt_state, "rng": self.rng}
        if self.extra is not None:
            d["extra"] = self.extra
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainState:
        return cls(step=d["step"], params=d["params"], opt_state=d["opt_state"], rng=d["rng"], extra=d.get("extra"))


@dataclass
class TrainResult:
    """What :func:`train` hands back: the final state and the records it logged in this call."""

    state: TrainState
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None
    examples_per_s: float | None = None  # mean over the steps after the first (compilation excluded)
    steps_per_s: float | None = None
    interrupted: bool = False

    @property
    def params(self) -> Params:
        return self.state.params

    @property
    def losses(self) -> list[float]:
        return [float(r["loss"]) for r in self.history if "loss" in r]


class ArrayBatches:
    """Batches drawn from in-memory arrays: a fresh seeded permutation every epoch, incomplete tail dropped.

    ``ArrayBatches({"x": x, "y": y}, batch_size=32, seed=0)[k]`` is a pure function of ``(seed, k)``.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, *, seed: int = 0, shuffle: bool = True):
        if not arrays:
            raise ValueError("ArrayBatches needs at least one array")
        sizes = {k: len(v) for k, v in arrays.items()}
        n = next(iter(sizes.values()))
        if any(s != n for s in sizes.values()):
            raise ValueError(f"ArrayBatches: arrays differ in length: {sizes}")
        if not 0 < batch_size <= n:
            raise ValueError(f"ArrayBatches: batch_size must be in 1..{n} (the number of examples), got {batch_size}")
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.n = n
        self.batches_per_epoch = n // batch_size
        self._perm: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self._perm[1]

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        if k < 0:
            raise IndexError(f"batch index must be >= 0, got {k}")
        epoch, i = divmod(int(k), self.batches_per_epoch)
        idx = self._permutation(epoch)[i * self.batch_size : (i + 1) * self.batch_size]
        return {name: arr[idx] for name, arr in self.arrays.items()}


def init_key(seed: int) -> jax.Array:
    """A key for parameter initialisation. It uses XLA's RngBitGenerator ("unsafe_rbg"): a model init with
    threefry keys makes one threefry program per parameter, which takes XLA:CPU ~30 s to compile even for a
    tiny model; RBG compiles in seconds. (Training keys stay threefry: few calls, reproducible everywhere.)"""
    return jax.random.key(int(seed), impl="unsafe_rbg")


def _get_batch(batches: Any, k: int) -> Batch:
    return batches(k) if callable(batches) and not hasattr(batches, "__getitem__") else batches[k]


def _batch_size(batch: Batch) -> int:
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError("a batch must contain at least one array")
    sizes = {np.shape(x)[0] for x in leaves}
    if len(sizes) != 1:
        raise ValueError(f"batch arrays disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


def _split_loss(out: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    if isinstance(out, tuple):
        if len(out) != 2 or not isinstance(out[1], Mapping):
            raise TypeError("loss_fn must return a scalar loss or a (loss, metrics dict) pair")
        return out[0], dict(out[1])
    return out, {}


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    grad_accum_steps: int = 1,
    mesh: Mesh | None = None,
    batch_axis: str = "data",
    extra_update: ExtraUpdate | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure (un-jitted) update: ``(state, batch) -> (state, metrics)``.

    Metrics whose name starts with ``_`` are side outputs of the loss (any shape) for ``extra_update``;
    under accumulation they come from the last micro-batch, the others are averaged over micro-batches.
    """
    accum = grad_accum_steps

    def grads_of(params: Params, batch: Batch, rng: jax.Array):
        def wrapped(p):
            return _split_loss(loss_fn(p, batch, rng))

        (loss, aux), grads = jax.value_and_grad(wrapped, has_aux=True)(params)
        return loss, aux, grads

    def step(state: TrainState, batch: Batch):
        rng = jax.random.fold_in(state.rng, state.step)
        if accum == 1:
            loss, aux, grads = grads_of(state.params, batch, rng)
        else:

            def to_micro(x):
                b = x.shape[0] // accum
                return x.reshape((b, accum) + x.shape[1:]).swapaxes(0, 1)  # (A, B, ...) interleaved

            micro = jax.tree.map(to_micro, batch)
            if mesh is not None:
                micro = jax.lax.with_sharding_constraint(micro, NamedSharding(mesh, PartitionSpec(None, batch_axis)))
            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(grads_of, state.params, first, rng)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

            def body(carry, xs):
                i, mb = xs
                loss, aux, grads = grads_of(state.params, mb, jax.random.fold_in(rng, i))
                mean_part = {k: v for k, v in aux.items() if not k.startswith("_")}
                last_part = {k: v for k, v in aux.items() if k.startswith("_")}
                summed = jax.tree.map(jnp.add, carry[0], (loss, mean_part, grads))
                return (summed, last_part), None

            zeros_mean = (zeros[0], {k: v for k, v in zeros[1].items() if not k.startswith("_")}, zeros[2])
            zeros_last = {k: v for k, v in zeros[1].items() if k.startswith("_")}
            (total, last), _ = jax.lax.scan(body, (zeros_mean, zeros_last), (jnp.arange(accum), micro))
            loss, aux, grads = jax.tree.map(lambda x: x / accum, total)
            aux = {**aux, **last}
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        extra = state.extra
        if extra_update is not None:
            params, extra = extra_update(params, extra, aux, state.step, jax.random.fold_in(rng, accum + 1))
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
        metrics.update({k: v for k, v in aux.items() if not k.startswith("_")})
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, extra=extra)
        return new, metrics

    return step


_JIT_CACHE: OrderedDict[Any, Any] = OrderedDict()


def _cached_jit(key: Any, build: Callable[[], Any], size: int = 16) -> Any:
    """One jitted step per (loss_fn, optimiser config, extra_update): repeated ``train`` calls in a process
    (resume, tests, sweeps over steps) reuse the compiled program instead of compiling it again."""
    try:
        hash(key)
    except TypeError:
        return build()
    if key in _JIT_CACHE:
        _JIT_CACHE.move_to_end(key)
        return _JIT_CACHE[key]
    fn = _JIT_CACHE[key] = build()
    if len(_JIT_CACHE) > size:
        _JIT_CACHE.popitem(last=False)
    return fn


def _copy(tree: Any) -> Any:
    """Fresh device arrays: the step donates its input state, and the caller's arrays must survive that."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _place_params(params: Params, mesh: Mesh | None, param_specs: Any) -> Params:
    if mesh is None:
        return _copy(params)
    if param_specs is None:
        return jax.device_put(params, NamedSharding(mesh, PartitionSpec()), may_alias=False)
    if callable(param_specs):
        specs = jax.tree_util.tree_map_with_path(lambda path, x: param_specs(path, x), params)
    else:
        specs = param_specs
    shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, PartitionSpec)
    )
    return jax.device_put(params, shardings, may_alias=False)


def _progress_bar(total: int, initial: int, enabled: bool | None):
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, unit="step")


def train(
    init: Params | TrainState,
    loss_fn: LossFn,
    batches: BatchSource | Callable[[int], Batch],
    *,
    steps: int,
    optim: OptimConfig,
    seed: int = 0,
    ckpt_dir: str | Path | None = None,
    save_every: int = 0,
    keep: int = 3,
    resume: bool = True,
    log_path: str | Path | None = None,
    log_every: int = 1,
    mesh: Mesh | None = None,
    param_specs: Any = None,
    batch_axis: str = "data",
    progress: bool | None = None,
    extra_init: Any = None,
    extra_update: ExtraUpdate | None = None,
    post_step: Callable[[TrainState, Batch], TrainState] | None = None,
    eval_fn: Callable[[Params], Mapping[str, Any]] | None = None,
    eval_every: int = 0,
    stop_after: int | None = None,
    meta: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train for ``steps`` updates (resuming from ``ckpt_dir`` when it holds a checkpoint).

    ``init``: initial params (fresh optimiser state) or a :class:`TrainState`. ``save_every``: checkpoint
    period in steps (a final checkpoint is always written when ``ckpt_dir`` is set). ``param_specs``: a pytree
    of ``PartitionSpec`` matching the params, or ``fn(path, leaf) -> PartitionSpec``; default replicated.
    ``extra_init``/``extra_update``: untrained state carried in :attr:`TrainState.extra` and its in-step
    update from the loss's ``_``-prefixed side outputs (see :func:`make_train_step`).
    ``post_step(state, host_batch) -> state`` runs on the host after each update (e.g. codebook restarts);
    it must be deterministic for resume to be exact. ``eval_fn(params) -> metrics`` runs every
    ``eval_every`` steps and its numbers join that step's log record. ``stop_after``: leave the loop after
    that step as if interrupted (tests, time-boxed runs). ``meta``: extra JSON stored with each checkpoint.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
    tx = make_optimizer(optim)
    schedule = make_schedule(optim)
    accum = optim.grad_accum_steps

    if isinstance(init, TrainState):
        state = init.replace(
            params=_place_params(init.params, mesh, param_specs),
            opt_state=_copy(init.opt_state),
            extra=_copy(init.extra),
            step=_copy(init.step),
            rng=_copy(init.rng),
        )
    else:
        params = _place_params(init, mesh, param_specs)
        state = TrainState(
            step=jnp.asarray(0, jnp.int32),
            params=params,
            opt_state=jax.jit(tx.init)(params),
            rng=jax.random.PRNGKey(seed),
            extra=_copy(extra_init) if extra_init is not None else None,
        )
    if mesh is not None:
        replicated = NamedSharding(mesh, PartitionSpec())
        state = state.replace(
            step=jax.device_put(state.step, replicated), rng=jax.device_put(state.rng, replicated)
        )
        state = state.replace(
            opt_state=jax.tree.map(_ensure_placed(replicated), state.opt_state),
            extra=jax.tree.map(_ensure_placed(replicated), state.extra),
        )

    ckpt = Checkpointer(ckpt_dir, save_every=save_every, keep=keep) if ckpt_dir is not None else None
    log = MetricsLog(log_path)
    run_meta = {"seed": int(seed), "optim": optim.to_dict(), **(dict(meta) if meta else {})}
    resumed_from = None
    if ckpt is not None and resume and ckpt.latest_step() is not None:
        saved_meta = ckpt.read_meta()
        if int(saved_meta.get("seed", seed)) != seed:
            raise ValueError(
                f"{ckpt.directory}: checkpoint was trained with seed {saved_meta.get('seed')}, this run uses "
                f"seed {seed}; resuming would change the data order (use another ckpt_dir or resume=False)"
            )
        restored, saved_meta = ckpt.restore(state.as_dict())
        state = TrainState.from_dict(restored)
        resumed_from = int(state.step)
        if int(saved_meta.get("data_position", resumed_from)) != resumed_from:
            raise ValueError(f"{ckpt.directory}: data position and step disagree in the checkpoint metadata")
        log.rewind(resumed_from)

    step_fn = make_train_step(
        loss_fn, tx, schedule, grad_accum_steps=accum, mesh=mesh, batch_axis=batch_axis, extra_update=extra_update
    )
    if mesh is not None:
        state_shardings = jax.tree.map(lambda x: x.sharding, state)
        batch_sharding = NamedSharding(mesh, PartitionSpec(batch_axis))
        jstep = jax.jit(
            step_fn,
            in_shardings=(state_shardings, batch_sharding),
            out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())),
            donate_argnums=0,
        )
        n_data = mesh.shape[batch_axis]
    else:
        batch_sharding = None
        jstep = _cached_jit((loss_fn, optim, extra_update), lambda: jax.jit(step_fn, donate_argnums=0))
        n_data = 1

    def put_batch(host_batch: Batch) -> Batch:
        bs = _batch_size(host_batch)
        if bs % (accum * n_data):
            raise ValueError(
                f"batch size {bs} must be divisible by grad_accum_steps ({accum}) x data-parallel devices ({n_data})"
            )
        if batch_sharding is None:
            return jax.tree.map(jnp.asarray, host_batch)
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(batch_sharding, np.asarray(x)), host_batch
        )

    def save(force: bool = False) -> None:
        if ckpt is None:
            return
        k = int(state.step)
        ckpt.save(k, state.as_dict(), {**run_meta, "data_position": k}, force=force)

    start = int(state.step)
    history: list[dict[str, Any]] = []
    bar = _progress_bar(steps, min(start, steps), progress)
    t_last = time.perf_counter()
    steps_since, examples_since = 0, 0
    timed_steps, timed_examples, timed_seconds = 0, 0, 0.0
    interrupted = False
    compile_in_interval = True  # the first step of a call pays for compilation: keep it out of the mean
    try:
        while int(state.step) < steps:
            k = int(state.step)
            host_batch = _get_batch(batches, k)
            bs = _batch_size(host_batch)
            state, metrics = jstep(state, put_batch(host_batch))
            if post_step is not None:
                state = post_step(state, host_batch)
            done = k + 1
            steps_since += 1
            examples_since += bs
            do_eval = eval_fn is not None and eval_every > 0 and (done % eval_every == 0 or done == steps)
            if done % log_every == 0 or done == steps or do_eval:
                host = jax.device_get(metrics)
                now = time.perf_counter()
                elapsed = now - t_last
                if not compile_in_interval:
                    timed_steps += steps_since
                    timed_examples += examples_since
                    timed_seconds += elapsed
                record = {"step": done, **{name: float(np.asarray(v)) for name, v in host.items()}}
                record["examples_per_s"] = examples_since / elapsed if elapsed > 0 else float("nan")
                record["time"] = time.time()
                if do_eval:
                    record.update({f"eval/{name}": v for name, v in eval_fn(state.params).items()})
                history.append(log.write(record))
                bar.set_postfix(loss=f"{record['loss']:.4f}", ex_s=f"{record['examples_per_s']:.1f}")
                t_last = time.perf_counter()
                steps_since, examples_since = 0, 0
                compile_in_interval = False
                if not math.isfinite(record["loss"]):
                    raise FloatingPointError(f"loss is {record['loss']} at step {done}")
            bar.update(1)
            save()
            if stop_after is not None and done >= stop_after and done < steps:
                interrupted = True
                break
        else:
            save(force=True)
    except KeyboardInterrupt:
        interrupted = True
        try:
            save(force=True)
        except Exception as exc:  # the state may have been donated to the step that was interrupted
            print(f"could not save a checkpoint on interrupt: {exc}", file=sys.stderr)
        raise
    finally:
        bar.close()
        if ckpt is not None:
            ckpt.close()
    return TrainResult(
        state=state,
        history=history,
        resumed_from=resumed_from,
        examples_per_s=timed_examples / timed_seconds if timed_seconds > 0 else None,
        steps_per_s=timed_steps / timed_seconds if timed_seconds > 0 else None,
        interrupted=interrupted,
    )


def _ensure_placed(sharding: NamedSharding) -> Callable[[Any], Any]:
    """Leaves of the optimiser state that are not yet on the mesh (e.g. host scalars) get replicated."""

    def place(x: Any) -> Any:
        if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == sharding.mesh:
            return x
        return jax.device_put(x, sharding, may_alias=False)

    return place
