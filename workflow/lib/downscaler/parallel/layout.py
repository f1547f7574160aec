"""One description of the hybrid-parallel layout and the DeviceMesh built from it.

This is the shape of torchtitan's ``ParallelDims``: five sizes (pipeline stages, data-parallel
replicas, FSDP shards, sequence ranks, Megatron tensor ranks) whose product is the world size,
checked against the model before anything is built, then turned into one 5-D mesh
``("pp", "dp_replicate", "dp_shard", "sp", "tp")`` (torchtitan's order). ``tp`` is innermost, so
a tensor-parallel group is consecutive ranks (on a GPU node: the fastest links carry the most
frequent collectives); ``pp`` is outermost (stages exchange one activation per micro-batch).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..model.reslim import ReslimConfig

__all__ = [
    "DCHAG_MODES",
    "MESH_DIMS",
    "SP_MODES",
    "Layout",
    "LayoutError",
    "build_mesh",
    "check_config",
    "check_microbatches",
    "check_parallel_config",
    "microbatches",
    "pipeline_problems",
    "resolve_sizes",
]

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "sp", "tp")
DCHAG_MODES = ("linear", "cross", "tree-linear", "tree-cross")
SP_MODES = ("ulysses", "lss")


class LayoutError(ValueError):
    """A parallel layout that does not fit the world size or the model (one message, all issues)."""


@dataclass(frozen=True)
class Layout:
    """Sizes of each parallel dimension; their product is the number of processes.

    - ``dp_replicate``: replica groups (DDP alone, or the replicate dim of HSDP);
    - ``dp_shard``: FSDP2 shard groups (parameters, gradients, optimizer state sharded);
    - ``tp``: Megatron tensor parallel over consecutive ranks;
    - ``sp``: sequence parallel (tokens of the transformer blocks split over ranks);
    - ``sp_mode``: ``"ulysses"`` (all-to-all, heads split over sp: needs ``num_heads`` divisible
      by ``tp*sp``) or ``"lss"`` (K/V all-gathered, all heads local: ``num_heads`` by ``tp``);
    - ``dchag``: ``None`` or one of ``DCHAG_MODES`` (``"linear"``, ``"cross"``,
      ``"tree-linear"``, ``"tree-cross"``): D-CHAG channel aggregation over the tp group (needs
      ``tp > 1``);
    - ``pp``: pipeline stages over the transformer blocks (``depth`` divisible by ``pp``); it
      composes with ``tp`` and plain data parallelism (``dp_replicate``), not (yet) with FSDP,
      sequence parallelism or D-CHAG.
    """

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    sp: int = 1
    dchag: str | None = None
    sp_mode: str = "ulysses"
    pp: int = 1

    @property
    def world_size(self) -> int:
        """Number of processes this layout needs."""
        return self.pp * self.dp_replicate * self.dp_shard * self.tp * self.sp

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different slices of the batch are processed at once."""
        return self.dp_replicate * self.dp_shard

    def dp_rank(self, mesh: DeviceMesh) -> int:
        """This rank's data-parallel index ``dp_replicate_rank * dp_shard + dp_shard_rank``
        (every pp, tp and sp rank of one data-parallel rank shares it)."""
        return (mesh["dp_replicate"].get_local_rank() * self.dp_shard
                + mesh["dp_shard"].get_local_rank())

    def _size_problems(self) -> list[str]:
        problems = []
        for name in MESH_DIMS:
            value = getattr(self, name)  # pp included
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be an integer >= 1, got {value!r}")
        if self.dchag is not None and self.dchag not in DCHAG_MODES:
            problems.append(
                f"dchag must be null or one of {', '.join(DCHAG_MODES)}, got {self.dchag!r}"
            )
        if self.sp_mode not in SP_MODES:
            problems.append(f"sp_mode must be 'ulysses' or 'lss', got {self.sp_mode!r}")
        return problems

    def validate(self, world_size: int, cfg: ReslimConfig) -> None:
        """Check this layout against ``world_size`` processes and the model ``cfg``.

        Raises ``LayoutError`` with one message listing every problem, so a user fixes a config
        in one round. Sequence-length divisibility by ``sp`` depends on the tile and is checked
        at forward time.
        """
        problems = self._size_problems()
        if problems:  # the arithmetic below needs valid integers
            raise LayoutError(_message(problems))
        if self.world_size != world_size:
            problems.append(
                f"pp*dp_replicate*dp_shard*sp*tp = {self.pp}*{self.dp_replicate}*"
                f"{self.dp_shard}*{self.sp}*{self.tp} = {self.world_size} but the world size is "
                f"{world_size}; make the product equal the number of processes"
            )
        problems += pipeline_problems(self, getattr(cfg, "depth", None))
        heads, dim = cfg.num_heads, cfg.embed_dim
        hidden = int(round(dim * cfg.mlp_ratio))
        head_split = self.tp * self.sp if self.sp_mode == "ulysses" else self.tp
        if heads % head_split and self.sp_mode == "ulysses":
            problems.append(
                f"num_heads={heads} is not divisible by tp*sp = {self.tp}*{self.sp} = "
                f"{head_split}; each tensor x sequence rank needs whole attention heads under "
                "sp_mode: ulysses (sp_mode: lss keeps all heads and only needs tp to divide them)"
            )
        elif heads % head_split:
            problems.append(
                f"num_heads={heads} is not divisible by tp={self.tp}; each tensor rank needs "
                "whole attention heads"
            )
        if dim % self.tp:
            problems.append(f"embed_dim={dim} is not divisible by tp={self.tp}")
        if hidden % self.tp:
            problems.append(
                f"MLP hidden size embed_dim*mlp_ratio = {hidden} is not divisible by "
                f"tp={self.tp}; change mlp_ratio or tp"
            )
        if self.dchag is not None:
            if self.tp < 2:
                problems.append(
                    f"dchag={self.dchag!r} splits the input channels over the tp group and needs "
                    f"tp > 1 (got tp={self.tp}); set tp >= 2 or dchag: null"
                )
            else:
                n_in, n_static = len(cfg.in_vars), len(cfg.static_vars)
                if (n_in + n_static) % self.tp:
                    problems.append(
                        f"dchag splits the channels in_vars + static_vars = {n_in} + {n_static} "
                        f"= {n_in + n_static} over tp={self.tp} ranks, which needs them "
                        "divisible by tp; add or drop variables, or change tp"
                    )
        if problems:
            raise LayoutError(_message(problems))

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> Layout:
        """Build from a config mapping such as ``{"dp_shard": 2, "tp": 2, "dchag": None}``.

        Missing keys take their defaults; unknown keys are an error (a typo such as ``"dp"``
        would otherwise silently run without parallelism).
        """
        if not isinstance(d, dict):
            raise LayoutError(
                f"parallel layout must be a mapping like {{'dp_shard': 2, 'tp': 2}}, got {d!r}"
            )
        known = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise LayoutError(f"unknown parallel layout key(s) {unknown}; valid keys are {known}")
        layout = cls(**d)
        problems = layout._size_problems()
        if problems:
            raise LayoutError(_message(problems))
        return layout


def pipeline_problems(layout: Layout, depth: int | None) -> list[str]:
    """What stops ``layout.pp`` stages over ``depth`` blocks (each message names the numbers
    and the nearest valid choice)."""
    if layout.pp == 1:
        return []
    problems = []
    if depth is not None and depth % layout.pp:
        valid = _divisors(depth)
        problems.append(
            f"pp={layout.pp} pipeline stages cannot split depth={depth} transformer blocks "
            f"equally; the nearest valid pp is {_nearest(layout.pp, valid)} (valid: {valid})")
    others = [f"{name}={getattr(layout, name)}" for name in ("dp_shard", "sp")
              if getattr(layout, name) > 1]
    if layout.dchag is not None:
        others.append(f"dchag={layout.dchag!r}")
    if others:
        problems.append(
            f"pp={layout.pp} composes with tp and dp_replicate (plain data parallelism) only, "
            f"not with {', '.join(others)}; set dp_shard: 1, sp: 1 and dchag: null (use "
            "dp_replicate for the data-parallel ranks), or pp: 1")
    return problems


def check_microbatches(microbatches: int, local_batch: int, pp: int,
                       schedule: str = "gpipe") -> list[str]:
    """What stops ``microbatches`` micro-batches of a data-parallel rank's ``local_batch``
    under ``schedule`` (1F1B needs at least one micro-batch per stage)."""
    if pp == 1:
        return []
    valid = _divisors(local_batch) if local_batch >= 1 else [1]
    if microbatches < 1 or local_batch % microbatches:
        return [f"parallel.microbatches={microbatches} does not divide the per-rank batch of "
                f"{local_batch} samples (train.batch_size / data-parallel ranks); the nearest "
                f"valid choice is {_nearest(microbatches, valid)} (valid: {valid})"]
    if schedule == "1f1b" and microbatches < pp:
        enough = [v for v in valid if v >= pp]
        hint = (f"set parallel.microbatches: {enough[0]}" if enough else
                f"raise train.batch_size to at least {pp} samples per data-parallel rank")
        return [f"pp_schedule: 1f1b needs at least one micro-batch per stage, but "
                f"microbatches={microbatches} < pp={pp} (per-rank batch {local_batch}); {hint}, "
                "or use pp_schedule: gpipe"]
    return []


def _message(problems: list[str]) -> str:
    """One error message listing every problem, numbered."""
    lines = "\n".join(f"  {i}. {p}" for i, p in enumerate(problems, 1))
    return f"invalid parallel layout ({len(problems)} problem(s)):\n{lines}"


def build_mesh(layout: Layout, device_type: str = "cpu") -> DeviceMesh:
    """The 5-D DeviceMesh ``("pp", "dp_replicate", "dp_shard", "sp", "tp")``, every dim present.

    Size-1 dims are kept so callers can always slice ``mesh["tp"]`` etc. Needs an initialised
    default process group of exactly ``layout.world_size`` ranks.
    """
    import torch.distributed as dist

    problems = layout._size_problems()
    if problems:
        raise LayoutError(_message(problems))
    if not dist.is_initialized():
        raise RuntimeError(
            "build_mesh needs torch.distributed initialised (dist.init_process_group, or "
            "downscaler.launcher.spawn for local processes)"
        )
    if dist.get_world_size() != layout.world_size:
        raise LayoutError(
            _message(
                [
                    f"the layout needs {layout.world_size} processes but the world size is "
                    f"{dist.get_world_size()}; make pp*dp_replicate*dp_shard*sp*tp equal it"
                ]
            )
        )
    shape = tuple(getattr(layout, name) for name in MESH_DIMS)
    return init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)


def resolve_sizes(par: dict[str, Any], world_size: int) -> dict[str, Any]:
    """The layout sizes of a ``parallel`` config section with ``dp_replicate: 0`` (auto) filled
    from the world size."""
    sizes = {k: par[k] for k in ("pp", "dp_replicate", "dp_shard", "tp", "sp")}
    rest = sizes["pp"] * sizes["dp_shard"] * sizes["tp"] * sizes["sp"]
    if sizes["dp_replicate"] == 0:
        if world_size % rest:
            raise LayoutError(_message([
                f"parallel.pp*dp_shard*tp*sp = {rest} does not divide the {world_size} "
                f"processes; {_nearest_hint(par, world_size)}"]))
        sizes["dp_replicate"] = world_size // rest
    return {**sizes, "dchag": par["dchag"], "sp_mode": par["sp_mode"]}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _nearest(value: int, allowed: list[int]) -> int:
    """The allowed value closest to ``value`` (the smaller one on a tie)."""
    return min(allowed, key=lambda a: (abs(a - value), a))


def _nearest_hint(par: dict[str, Any], world: int, cfg: Any = None) -> str:
    """A concrete valid choice near the requested one: pp first (stages that split the blocks),
    then tp, sp and dp_shard."""
    heads = getattr(cfg, "num_heads", None)
    depth = getattr(cfg, "depth", None)
    choice: dict[str, int] = {}
    left = world
    if par["pp"] > 1:
        choice["pp"] = _nearest(par["pp"], [d for d in _divisors(left)
                                             if depth is None or depth % d == 0])
        left //= choice["pp"]
    for key in ("tp", "sp", "dp_shard"):
        free = key == "dp_shard" or (key == "sp" and par["sp_mode"] == "lss")
        allowed = [d for d in _divisors(left)
                   if heads is None or free or heads % (d * choice.get("tp", 1)) == 0]
        if "pp" in choice and key != "tp":
            allowed = [1]  # the pipeline composes with tp and dp_replicate only
        choice[key] = _nearest(par[key], allowed)
        left //= choice[key]
    text = ", ".join(f"{k}: {v}" for k, v in choice.items())
    return (f"the nearest valid choice for {world} processes is {text} "
            "(dp_replicate: 0 fills the rest)")


def check_parallel_config(par: dict[str, Any], cfg: Any, batch_size: int | None = None) -> None:
    """Validate the ``parallel`` config section at config time, before anything runs.

    ``cfg`` has the model's ``num_heads``, ``embed_dim``, ``mlp_ratio``, ``depth``, ``in_vars``
    and ``static_vars``; ``batch_size`` (the global batch) is checked against the pipeline's
    micro-batches. A local multi-process run (``processes > 1``) must fit the layout exactly;
    under srun the task count decides, so with ``processes: 1`` only the model checks run (the
    world size is checked again when the ranks start). Raises ``LayoutError`` with one message
    that lists every problem and the nearest valid choice.
    """
    if par["engine"] == "deepspeed":
        if par["layout"] == "auto":
            raise LayoutError(_message([
                "parallel.layout: auto plans layouts of the torch engine; with engine: "
                "deepspeed (plain data parallelism under ZeRO) set parallel.layout: manual"]))
        if any(par[k] != 1 for k in ("dp_shard", "tp", "sp", "pp")) or par["dchag"]:
            raise LayoutError(_message([
                "parallel.engine is 'deepspeed', which shards with ZeRO (parallel.zero_stage) over "
                "plain data parallelism; set parallel.dp_shard, tp, sp and pp to 1 and dchag: "
                "null, or use engine: torch for FSDP/TP/SP/D-CHAG/pipeline layouts"]))
        return
    if par["layout"] == "auto":
        _check_auto(par)
        return  # the planner picks a valid layout when the ranks start
    world = par["processes"]
    if world <= 1:  # srun decides: check the model against the layout as given
        world = (par["pp"] * par["dp_shard"] * par["tp"] * par["sp"]
                 * max(1, par["dp_replicate"]))
    layout = Layout.from_config(resolve_sizes(par, world))
    try:
        layout.validate(world, cfg)
    except LayoutError as err:
        raise LayoutError(f"{err}\n  {_nearest_hint(par, world, cfg)}") from None
    if batch_size is not None and layout.pp > 1:
        local = batch_size // layout.dp
        problems = check_microbatches(microbatches(par, layout.pp, local), local, layout.pp,
                                      par["pp_schedule"])
        if problems:
            raise LayoutError(_message(problems))


def microbatches(par: Any, pp: int, local_batch: int) -> int:
    """``parallel.microbatches``; 0 means one per stage, or the largest divisor of the per-rank
    batch ``local_batch`` below that."""
    value = par["microbatches"] if isinstance(par, dict) else par.microbatches
    return value or max(d for d in _divisors(max(1, local_batch)) if d <= pp)


# The keys ``parallel.layout: auto`` chooses, at the defaults it needs them left at.
AUTO_KEYS = {"dp_replicate": 0, "dp_shard": 1, "tp": 1, "sp": 1, "sp_mode": "ulysses",
             "activation_checkpointing": False, "dchag": None, "pp": 1}


def _check_auto(par: dict[str, Any]) -> None:
    """``layout: auto`` owns the layout keys: any other value would be silently overridden."""
    set_by_hand = [f"{k}: {par[k]}" for k, default in AUTO_KEYS.items()
                   if par[k] != default]
    if set_by_hand:
        raise LayoutError(_message([
            f"parallel.layout is 'auto' (the planner chooses the layout at start-up) but "
            f"parallel sets {', '.join(set_by_hand)}; remove them (auto never proposes D-CHAG, "
            "an architecture change) or set parallel.layout: manual"]))


def check_config(config: dict[str, Any]) -> None:
    """``check_parallel_config`` on a whole validated config (``config.validate_config`` calls
    it); raises ``ConfigError`` naming ``parallel``."""
    from types import SimpleNamespace

    from ..config import ConfigError, stage_names
    from ..model.presets import PRESETS
    from ..model.reslim import ReslimConfig

    model = {**PRESETS[config["model"]["preset"]], **config["model"]}
    if config["parallel"]["dchag"] and model["architecture"] != "reslim":
        raise ConfigError(f"config key parallel.dchag: D-CHAG splits Reslim's channel "
                          f"aggregation; model.architecture {model['architecture']} has none: "
                          "remove parallel.dchag")
    if config["parallel"]["pp"] > 1 and model["architecture"] != "reslim":
        raise ConfigError(f"config key parallel.pp: the pipeline splits Reslim's blocks into "
                          f"stages; model.architecture {model['architecture']} is not "
                          "supported: set parallel.pp: 1")
    cfg = SimpleNamespace(num_heads=model["num_heads"], embed_dim=model["embed_dim"],
                          mlp_ratio=ReslimConfig.mlp_ratio,  # no config key sets it
                          depth=model["depth"],
                          in_vars=stage_names(config)["inputs"],
                          static_vars=list(config["statics"]))
    try:
        check_parallel_config(config["parallel"], cfg, config["train"]["batch_size"])
    except LayoutError as err:
        raise ConfigError(f"config key parallel: {err}") from None
