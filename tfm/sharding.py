"""Logical axis names and the rules that map them onto a device mesh.

Every parameter in tfm is created with logical axis names
(``nn.with_logical_partitioning(init, ("embed", "mlp"))``) and activations are
constrained at block boundaries with ``nn.with_logical_constraint``. The names
are defined here, once. Which *mesh* axis a logical axis lands on is a property
of the run, not of the model: it lives in the run config as a tuple of
``(logical_name, mesh_axis_or_None)`` rules, with ``DEFAULT_RULES`` as the
starting point.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with the
parameters sharded, ZeRO-3 style), ``tensor`` (Megatron-style model parallel)
and ``expert`` (Mixture-of-Experts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import jax

# Logical axis names --------------------------------------------------------
# Activations.
BATCH = "batch"
LENGTH = "length"  # query / sequence positions (T)
KV_LENGTH = "kv_length"  # key/value positions (S)
EMBED = "embed"  # model width (D)
HEADS = "heads"  # query heads (N)
KV_HEADS = "kv_heads"  # key/value heads (K)
HEAD_DIM = "head_dim"  # width of one head (H)
MLP = "mlp"  # feed-forward hidden width (F)
VOCAB = "vocab"  # vocabulary (V)
# Parameters only.
LAYERS = "layers"  # the stacked axis that nn.scan adds to every block parameter
POSITIONS = "positions"  # learned absolute position table
RELPOS_BUCKETS = "relpos_buckets"  # T5 relative-position buckets
PATCH = "patch"  # flattened ViT patch (P*P*C)
CLASSES = "classes"  # classification labels
NORM = "norm"  # LayerNorm / RMSNorm scale and bias
EXPERT = "expert"  # Mixture-of-Experts experts (E)
EXPERT_BATCH = "expert_batch"  # token groups while they sit at their experts ([E, G, C, D])

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# A sensible default: batch over (data, fsdp, expert); parameters' widest axes
# over fsdp; heads and the FFN hidden width over tensor (Megatron); experts over
# expert. Outside MoE layers the expert axis is one more data-parallel axis
# (GShard); inside, the tokens move to their experts' devices (all-to-all) and the
# groups are split over (data, fsdp) only. Axes mapped to None are replicated.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (BATCH, ("data", "fsdp", "expert")),
    (LENGTH, None),
    (KV_LENGTH, None),
    (EMBED, "fsdp"),
    (HEADS, "tensor"),
    (KV_HEADS, "tensor"),
    (HEAD_DIM, None),
    (MLP, "tensor"),
    (VOCAB, "tensor"),
    (LAYERS, None),
    (POSITIONS, None),
    (RELPOS_BUCKETS, None),
    (PATCH, None),
    (CLASSES, None),
    (NORM, None),
    (EXPERT, "expert"),
    (EXPERT_BATCH, ("data", "fsdp")),
)


def logical_axis_names() -> tuple[str, ...]:
    """All logical axis names the layers may use."""
    return tuple(name for name, _ in DEFAULT_RULES)


def validate_rules(rules: Sequence[tuple[str, object]], mesh_axes: Sequence[str] = MESH_AXES) -> None:
    """Raise ``ValueError`` naming the offending rule if ``rules`` are malformed."""
    known = set(logical_axis_names())
    for rule in rules:
        if len(rule) != 2:
            raise ValueError(f"a logical-axis rule must be (logical_name, mesh_axes), got {rule!r}")
        name, target = rule
        if name not in known:
            raise ValueError(f"unknown logical axis {name!r} in rules; known: {sorted(known)}")
        targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        for t in targets:
            if t not in mesh_axes:
                raise ValueError(f"rule {rule!r} maps to mesh axis {t!r}, not one of {tuple(mesh_axes)}")


# Meshes ---------------------------------------------------------------------


def mesh_shape(axes: dict[str, int], num_devices: int) -> dict[str, int]:
    """Resolve a ``{mesh_axis: size}`` request (one size may be -1 = the rest) for ``num_devices``.

    Raises ``ValueError`` naming the axis and the numbers when the product does
    not match the device count.
    """
    unknown = set(axes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; mesh axes are {MESH_AXES}")
    sizes = {a: int(axes.get(a, 1)) for a in MESH_AXES}
    rest = [a for a, s in sizes.items() if s == -1]
    bad = [a for a, s in sizes.items() if s == 0 or s < -1]
    if bad:
        raise ValueError(f"mesh axis {bad[0]}={sizes[bad[0]]}: sizes must be positive or -1")
    if len(rest) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {rest}")
    fixed = 1
    for a, s in sizes.items():
        if s != -1:
            fixed *= s
    if rest:
        if num_devices % fixed:
            raise ValueError(
                f"mesh {sizes}: the fixed axes multiply to {fixed}, which does not divide the {num_devices} devices"
            )
        sizes[rest[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(f"mesh {sizes} has {fixed} devices but {num_devices} are available")
    return sizes


def make_mesh(axes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A ``jax.sharding.Mesh`` over ``devices`` (default: all) with axes ``MESH_AXES``, automatic partitioning."""
    import jax

    devices = jax.devices() if devices is None else list(devices)
    sizes = mesh_shape(axes, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices)


def make_rules(overrides: dict | None = None) -> tuple[tuple[str, object], ...]:
    """``DEFAULT_RULES`` with some logical axes re-mapped.

    ``overrides`` maps a logical name to a mesh axis, a tuple of mesh axes, a
    comma-separated string of them (``"data,fsdp"``), or ``None`` / ``""``
    (replicated) — the forms a run config and a command line can carry.
    """
    overrides = dict(overrides or {})
    known = set(logical_axis_names())
    for name in overrides:
        if name not in known:
            raise ValueError(f"unknown logical axis {name!r} in mesh rules; known: {sorted(known)}")

    def norm(target):
        if target is None or target == "" or target == "None":
            return None
        if isinstance(target, str):
            parts = tuple(p.strip() for p in target.split(",") if p.strip())
            return parts[0] if len(parts) == 1 else parts
        return tuple(target)

    rules = tuple((name, norm(overrides[name]) if name in overrides else target) for name, target in DEFAULT_RULES)
    validate_rules(rules)
    return rules


def batch_axes(rules: Sequence[tuple[str, object]]) -> tuple[str, ...]:
    """The mesh axes the ``batch`` logical axis is split over."""
    target = dict(rules)[BATCH]
    return () if target is None else (target,) if isinstance(target, str) else tuple(target)
