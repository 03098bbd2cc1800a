"""Recipes: one YAML file that says what to convert, with what, trained how, and evaluated how.

Validated by pydantic with unknown keys rejected; errors become one line with the field path and a
hint. `--set a.b=value` overrides are applied to the raw YAML before validation, so they are
validated exactly like the file. Each top-level section is a `*Section` model (`DistillSection` is
`distill:`); the `*Spec` classes elsewhere are what plugins register (`MixerSpec`, `AnalyzerSpec`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from replacer.defaults import DEFAULT_MIXER
from replacer.errors import ReplacerError, summary


class RecipeError(ReplacerError):
    """A recipe file or override is invalid."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(Strict):
    source: str = Field(description="timm name, HF model dir, hf:ID, minilm, smollm2 or module:callable")
    pretrained: bool = Field(True, description="load pretrained weights (from the hub or the offline package)")
    checkpoint: Path | None = Field(None, description="local weights file (.safetensors, .pth, .bin) to load instead")
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="architecture arguments: timm constructor arguments (img_size, in_chans, depth, ...), "
        "transformers config overrides, or a callable's keyword arguments",
    )
    tokenizer: str | None = Field(None, description="tokenizer source for text models (default: the model source)")
    task: Literal["auto", "embedding", "classification", "causal-lm"] = Field(
        "auto", description="what the model computes; decides losses and metrics"
    )


class TextData(Strict):
    kind: Literal["text"] = Field("text", description="plain text (the default kind)")
    source: str = Field(description="docstrings, wordnet, fortunes, bible, file:PATH, prose:GLOB, jsonl:PATH or hf:NAME")
    parts: list[str] | None = Field(
        None, description="named parts of the source: fortune files (songs-poems, knghtbrd, ...) or WordNet's noun, verb, adj, adv"
    )
    match: str | None = Field(None, description="keep the texts in which this regular expression is found (before limit)")
    label: str | None = Field(None, description="the name its figures go under in the report (default: source, parts, match)")
    limit: PositiveInt | None = Field(None, description="at most this many examples (default: all)")
    field: str = Field("text", description="the text field of a JSONL file or a datasets dataset")
    split: str = Field("train", description="the split of a datasets dataset")
    max_length: PositiveInt = Field(128, description="tokens per example; longer texts are cut")
    passages: bool = Field(
        False, description="join the consecutive texts of each document (a book's verses, a file's sentences or fortunes) "
        "into passages that fill max_length tokens (at about 4 characters a token): long contexts for calibration",
    )

    @field_validator("match")
    @classmethod
    def _is_pattern(cls, match: str | None) -> str | None:
        if match is not None:
            try:
                re.compile(match)
            except re.error as exc:
                raise ValueError(f"{match!r} is not a regular expression ({exc})") from None
        return match

    @property
    def name(self) -> str:
        """What the report calls this source."""
        if self.label:
            return self.label
        parts = f"[{', '.join(self.parts)}]" if self.parts else ""
        return self.source + parts + (f" ~ /{self.match}/" if self.match else "") + (" passages" if self.passages else "")


class ImageFolderData(Strict):
    kind: Literal["image-folder"] = Field(description="ImageNet-style folder: one sub-folder of images per class")
    root: Path = Field(description="the folder holding the class folders")
    image_size: PositiveInt = Field(224, description="images are resized and centre-cropped to this size")
    limit: PositiveInt | None = Field(None, description="at most this many images (default: all)")

    @property
    def name(self) -> str:
        """What the report calls this source."""
        return str(self.root)


class IdxData(Strict):
    kind: Literal["idx"] = Field(description="IDX image and label files (MNIST, Fashion-MNIST)")
    folder: Path = Field(
        Path("/usr/share/datasets/fashion-mnist"), description="holds the *-images-idx3-ubyte(.gz) and label files"
    )
    split: Literal["train", "test"] = Field("train", description="train (60k) or test (10k, t10k-* files)")
    limit: PositiveInt | None = Field(None, description="at most this many images (default: all)")

    @property
    def name(self) -> str:
        """What the report calls this source."""
        return f"{self.folder.name} {self.split}"


class DigitsData(Strict):
    kind: Literal["digits"] = Field(description="scikit-learn's 8 x 8 handwritten digits (bundled with it)")
    split: Literal["train", "test"] = Field("train", description="a fixed 80 / 20 split")

    @property
    def name(self) -> str:
        """What the report calls this source."""
        return f"digits {self.split}"


DataSource = Annotated[Union[TextData, ImageFolderData, IdxData, DigitsData], Field(discriminator="kind")]


class DataSection(Strict):
    train: list[DataSource] = Field(min_length=1, description="concatenated: each source's share is its example count")
    eval: list[DataSource] = Field(
        min_length=1, description="held out, ideally genres unlike train's; with several, the report gives each its own figures"
    )
    batch_size: PositiveInt = Field(32, description="examples per batch in every stage")

    @model_validator(mode="after")
    def _eval_names_differ(self) -> DataSection:
        names = [source.name for source in self.eval]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"eval sources share the name {', '.join(repeated)}: give each a distinct label")
        return self


class TeacherSection(Strict):
    train: bool = Field(
        False, description="train the teacher from scratch on data.train first (where no pretrained weights exist)"
    )
    steps: int = Field(2000, ge=1, description="optimizer steps (batches of data.batch_size)")
    lr: float = Field(1e-3, gt=0, le=1, description="AdamW peak learning rate (warm-up, then cosine decay)")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay")
    checkpoint_every: PositiveInt = Field(200, description="steps between resumable checkpoints")


class MixerChoice(Strict):
    plugin: str = Field(DEFAULT_MIXER, description="a mixer plugin from `replacer plugins`")
    options: dict[str, Any] = Field(default_factory=dict, description="the plugin's options (validated by it)")


class SitePolicy(Strict):
    policy: Literal["sparsest", "densest", "random", "recent-heads", "sparse-heads", "random-heads"] = Field(
        description="replace the layers whose teacher attention is sparsest (lowest entropy), densest, or random "
        "ones; or single heads (head-level hybrids): those with the highest recency ratio (RecurFormer), the lowest "
        "attention entropy, or random ones"
    )
    layers: PositiveInt | None = Field(None, description="layer policies: how many layers to replace")
    fraction: float | None = Field(
        None, gt=0, le=1, description="or: the fraction of layers (layer policies) or of all heads (head policies) to replace"
    )
    threshold: float | None = Field(
        None, gt=0, le=1, description="recent-heads: or every head whose recency ratio reaches this"
    )
    seed: int = Field(0, description="seeds the random policies")
    kv_groups: bool = Field(
        False, description="head policies: take whole key/value groups (grouped-query attention), a group's query "
        "heads together, ranked by their mean recency; the KV cache then shrinks by the fraction of groups replaced, "
        "and fraction counts groups"
    )
    per_layer: float | None = Field(
        None, gt=0, le=1, description="head policies: at most this fraction of one layer's heads (or groups), rounded "
        "down; the budget is filled from the other layers"
    )

    @property
    def by_heads(self) -> bool:
        return self.policy.endswith("-heads")

    @model_validator(mode="after")
    def _one_budget(self) -> "SitePolicy":
        if self.policy in ("random-heads", "sparse-heads"):
            if self.layers is not None or self.threshold is not None or self.fraction is None:
                raise ValueError(f"{self.policy} takes fraction (of all heads)")
        elif self.policy == "recent-heads":
            if self.layers is not None or (self.threshold is None) == (self.fraction is None):
                raise ValueError("recent-heads takes exactly one of threshold (a recency ratio) or fraction (of all heads)")
        elif self.threshold is not None or (self.layers is None) == (self.fraction is None):
            raise ValueError("give exactly one of layers (a count) or fraction (of all layers)")
        if not self.by_heads and (self.kv_groups or self.per_layer is not None):
            raise ValueError(f"kv_groups and per_layer are options of head policies, not of {self.policy}")
        return self


class AnalyzeSection(Strict):
    enabled: bool = Field(
        False, description="analyse the teacher's attention before distilling (always on for sparsest / densest site policies)"
    )
    analyzer: str = Field("sparsity", description="an analyzer plugin from `replacer plugins`")
    batches: PositiveInt = Field(8, description="training batches the teacher runs for the analysis")
    options: dict[str, Any] = Field(
        default_factory=dict, description="the analyzer's options (sparsity: top_k, default 8; window, default 16)"
    )


class SparsifySection(Strict):
    enabled: bool = Field(
        False, description="make the teacher's attention sparse before distilling (Sparsity to Simplicity)"
    )
    top_k: PositiveInt = Field(8, description="keys each query keeps (its highest-scoring ones)")
    recovery_steps: int = Field(100, ge=0, description="steps training the sparse teacher (every weight) to match the dense one")
    lr: float = Field(1e-4, gt=0, le=1, description="learning rate of the recovery")
    checkpoint_every: PositiveInt = Field(50, description="steps between resumable checkpoints")


class DistillSection(Strict):
    enabled: bool = Field(True, description="run the stage (false: mixers keep their initialisation)")
    steps: int = Field(500, ge=0, description="optimizer steps per site")
    lr: float = Field(3e-3, gt=0, le=1, description="AdamW peak learning rate (warm-up, then cosine decay)")
    loss: Literal["mse", "cosine", "mse+cosine"] = Field(
        "mse", description="against the teacher's site output; cosine is 1 - cosine per token (FAR)"
    )
    head_target: Literal["heads", "projected", "heads+projected"] = Field(
        "heads", description="head-level hybrids: match each replaced head's output before the output projection "
        "(LoLCATs), the replaced heads' contribution after it, or both summed; whole-site replacements match the "
        "site's output either way",
    )
    calibration_batches: PositiveInt = Field(64, description="teacher batches captured per site")
    cache: Literal["memory", "disk"] = Field("memory", description="where captured teacher pairs are held")
    cache_max_gb: float = Field(2.0, gt=0, description="memory cache bound; capture stops early at the bound")
    workers: PositiveInt = Field(1, description="processes training sites in parallel (disk cache)")
    checkpoint_every: PositiveInt = Field(100, description="steps between resumable checkpoints")

    @model_validator(mode="after")
    def _workers_read_from_disk(self) -> "DistillSection":
        if self.workers > 1 and self.cache != "disk":
            raise ValueError("workers > 1 read pairs from a disk cache: set distill.cache to disk")
        return self


class LoraSection(Strict):
    rank: PositiveInt = Field(8, description="rank of each low-rank adapter")
    alpha: float = Field(16.0, gt=0, description="adapter scale numerator: updates are scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    targets: list[str] | None = Field(
        None, min_length=1, description="glob patterns over module names of the linear layers to adapt; default every "
        "linear layer outside the mixers except the output head",
    )


class TuneSection(Strict):
    enabled: bool = Field(True, description="run the stage")
    steps: int = Field(200, ge=0, description="optimizer steps")
    lr: float = Field(1e-3, gt=0, le=1, description="learning rate of the mixers")
    other_lr_scale: float = Field(
        0.1, gt=0, description="learning rate of the other trained parameters, as a fraction of lr (pretrained weights move less)"
    )
    train: Literal["mixers", "all", "lora"] | list[str] = Field(
        "mixers", description="mixers, all, lora (the mixers plus low-rank adapters on the kept linear layers, merged "
        "into them before the student is saved), or glob patterns over parameter names",
    )
    lora: LoraSection = Field(default_factory=LoraSection, description="the adapters of train: lora")
    kd_weight: float = Field(
        1.0, ge=0, description="weight of distillation from the teacher (logit KL, or embedding / hidden-state loss)"
    )
    task_weight: float = Field(1.0, ge=0, description="weight of the task loss where data has labels")
    temperature: float = Field(1.0, gt=0, description="logit distillation temperature")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun: ddp gives every process the whole student; fsdp shards its weights, "
        "gradients and Adam moments across the processes (PyTorch fully_shard), each layer gathered only while it runs"
    )
    checkpoint_every: PositiveInt = Field(50, description="steps between resumable checkpoints")


class PruneSection(Strict):
    enabled: bool = Field(False, description="run the stage: a family of smaller students, one per budget")
    budgets: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        [0.75, 0.5], min_length=1,
        description="fractions of the tuned student's parameters (its mixers', or the whole model's, see scope) "
        "or of its CPU latency (see target) to keep; each budget starts from the next larger one",
    )
    scope: Literal["mixers", "model"] = Field(
        "mixers", description="what is cut and what parameter budgets are fractions of: the mixers alone, or the whole "
        "model (also every block's MLP hidden channels and the kept heads of head-level hybrids, in one ranking)",
    )
    balance: Literal["measured", "mean", "none"] = Field(
        "measured", description="scope model: how kinds (mixer units, MLP channels, kv heads, embedding components) "
        "compete in one ranking: measured zeroes each kind's least important groups at eight depths and ranks every "
        "group by the loss per parameter its kind's cut costs on balance_batches batches; mean divides each group's "
        "importance by its kind's mean (sizes ignored); none ranks raw scores",
    )
    balance_batches: PositiveInt = Field(4, description="training batches whose loss the measured balance averages")
    embeddings: bool = Field(
        True, description="scope model: factorise the token embedding (codes x basis, an SVD with each token's row "
        "weighted by how often the training data holds it) and rank its components with the rest; tied output "
        "heads keep it whole",
    )
    frequency_batches: PositiveInt = Field(
        100, description="training batches whose tokens are counted to weight the embedding's factorisation",
    )
    target: Literal["params", "latency"] = Field(
        "params", description="what budgets are fractions of: mixer parameters, or the tuned student's CPU latency "
        "at the first of evaluate.latency_batch_sizes (met by timing pruned copies; uniform makes latency fall further)",
    )
    importance: Literal["magnitude", "taylor", "hoyer"] = Field(
        "magnitude",
        description="how groups are ranked (globally, across sites): weight norm, first-order Taylor on "
        "distillation batches, or weight norm after training with FAR's Hoyer-square group penalty",
    )
    uniform: bool = Field(
        False, description="cut every head and direction of a site by the same number of units (equal widths: "
        "compute falls with parameters) instead of ranking single units"
    )
    taylor_batches: PositiveInt = Field(8, description="batches whose gradients the taylor importance sums")
    hoyer_weight: float = Field(1e-3, gt=0, description="weight of the Hoyer-square penalty (importance hoyer)")
    hoyer_steps: int = Field(100, ge=1, description="end-to-end steps with the penalty before ranking (importance hoyer)")
    recovery_steps: int = Field(100, ge=0, description="end-to-end distillation steps after each cut")
    lr: float = Field(1e-3, gt=0, le=1, description="learning rate of the penalty and recovery steps")
    checkpoint_every: PositiveInt = Field(50, description="steps between resumable checkpoints")


class EvaluateSection(Strict):
    baseline: bool = Field(True, description="also evaluate the same mixers untrained (`untrained` in the report)")
    latency: bool = Field(True, description="time teacher and students on the CPU")
    latency_batch_sizes: list[PositiveInt] = Field([1], min_length=1, description="batch sizes timed on the CPU")
    latency_repeats: PositiveInt = Field(
        10, description="timed repeats per batch size (the median is reported; the teacher and the students are timed in turns)"
    )
    site_error_batches: PositiveInt = Field(2, description="held-out batches for per-site and per-layer similarity")
    figures: bool = Field(True, description="write PNG figures (loss curves, similarity per site and layer, ...)")
    ecosystem: bool = Field(
        True, description="also measure teacher and students with their ecosystem's own evaluators where installed "
        "(sentence-transformers' retrieval and triplet evaluators for embedding models)",
    )


class ExportSection(Strict):
    enabled: bool = Field(True, description="write the final model into the run directory")
    formats: list[str] | None = Field(
        None, min_length=1,
        description="replacer (runs/<name>/model: safetensors + manifest) and formats plugins provide "
        "(sentence-transformers: runs/<name>/sentence-transformers); default: replacer plus the task's own "
        "(sentence-transformers for embedding models, where the package is installed)",
    )


class Recipe(Strict):
    name: str = Field(description="names the run directory and the report")
    seed: int = Field(0, description="seeds mixer initialisation and data order")
    run_dir: Path | None = Field(None, description="default: runs/<name>")
    model: ModelSection = Field(description="the teacher")
    data: DataSection = Field(description="training and held-out evaluation data")
    teacher: TeacherSection = Field(default_factory=TeacherSection, description="train the teacher first (offline vision)")
    sites: Literal["all"] | list[int | str] | SitePolicy = Field(
        "all", description="all; layer indices / names / globs; or a policy: {policy: sparsest, layers: 3}"
    )
    analyze: AnalyzeSection = Field(default_factory=AnalyzeSection, description="attention analysis of the teacher")
    sparsify: SparsifySection = Field(default_factory=SparsifySection, description="teacher sparsification before distillation")
    mixer: MixerChoice = Field(default_factory=MixerChoice, description="the mixer plugin and its options")
    distill: DistillSection = Field(default_factory=DistillSection, description="block-wise distillation")
    tune: TuneSection = Field(default_factory=TuneSection, description="end-to-end tuning")
    prune: PruneSection = Field(default_factory=PruneSection, description="global structural pruning to several budgets")
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection, description="held-out evaluation")
    export: ExportSection = Field(default_factory=ExportSection, description="the final model as safetensors + manifest")

    @field_validator("sites", mode="before")
    @classmethod
    def _some_site(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("[] selects no site; give all, layer indices, names or globs, or a policy")
        return value

    @model_validator(mode="after")
    def _trained_teacher_starts_from_scratch(self) -> "Recipe":
        if self.teacher.train and (self.model.pretrained or self.model.checkpoint is not None):
            raise ValueError(
                "teacher.train trains the teacher from random weights: set model.pretrained to false "
                "and leave model.checkpoint unset (or turn teacher.train off to use those weights)"
            )
        return self

    @model_validator(mode="after")
    def _sharded_tuning_takes_no_weight_penalty(self) -> "Recipe":
        if self.tune.parallel == "fsdp" and self.prune.enabled and self.prune.importance == "hoyer":
            raise ValueError("prune.importance hoyer adds a penalty on the whole student's weights, which "
                             "tune.parallel fsdp shards: use tune.parallel ddp, or another importance")
        return self

    @property
    def directory(self) -> Path:
        return self.run_dir or Path("runs") / self.name

    def fingerprint(self) -> str:
        """What makes two runs the same run: every setting up to distillation (the run dir and `LATER` excluded;
        with `sparsify` on the tune section is kept in, as the sparse teacher recovers with its losses).

        Settings left at their defaults are left out, so a newer replacer that adds a field (with a
        default) still resumes runs made before it.
        """
        later = [s for s in LATER if not (s == "tune" and self.sparsify.enabled)]
        return _digest(self.model_dump(mode="json", exclude={"run_dir", *later}, exclude_defaults=True))

    def fingerprint_before_retuning(self) -> str:
        """The fingerprint runs recorded before a changed tune section could be redone (it counted tune in), so
        those runs still resume."""
        return _digest(self.model_dump(mode="json", exclude={"run_dir", *LATER[1:]}, exclude_defaults=True))

    def section_fingerprints(self) -> dict[str, str]:
        """The sections of stages that may change on a finished run: each reruns its stage and the ones after."""
        return {section: _digest(getattr(self, section).model_dump(mode="json", exclude_defaults=True)) for section in LATER}


LATER = ("tune", "prune", "evaluate", "export")
"""Recipe sections (and stages, in order) that a finished run redoes when they change, instead of refusing:
a new tuning starts again from the distilled student, so trying tuning settings costs no distillation."""


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def apply_override(raw: dict, assignment: str) -> None:
    """`a.b.c=value` (value parsed as YAML) into the raw recipe mapping."""
    path, sep, value = assignment.partition("=")
    if not sep or not path:
        raise RecipeError(f"--set {assignment!r} is not KEY.PATH=VALUE (e.g. --set distill.steps=2, data.train.0.limit=100)")
    node: Any = raw
    keys = path.split(".")
    for key in keys[:-1]:
        if isinstance(node, list):
            node = _list_item(node, key, path)
            continue
        node = node.setdefault(key, {})
        if not isinstance(node, (dict, list)):
            raise RecipeError(f"--set {path}: '{key}' is not a section")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise RecipeError(
            f"--set {path}: the value {value!r} is not YAML ({_yaml_problem(exc)}); quote text that holds ':' or '#'"
        ) from None
    if isinstance(node, list):
        node[_list_index(node, keys[-1], path)] = parsed
    else:
        node[keys[-1]] = parsed


def _list_index(items: list, key: str, path: str) -> int:
    if not key.isdigit() or int(key) >= len(items):
        raise RecipeError(f"--set {path}: '{key}' is not an index of a list of {len(items)} items")
    return int(key)


def _list_item(items: list, key: str, path: str) -> Any:
    return items[_list_index(items, key, path)]


def _explain(exc: ValidationError, origin: str) -> str:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and p in ("text", "image-folder", "idx", "digits"))]
    field = ".".join(loc) or "(recipe)"
    if err["type"] == "extra_forbidden":
        parent_model = _model_at(Recipe, err["loc"][:-1])
        known = list(parent_model.model_fields) if parent_model else []
        close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known fields: {', '.join(known)}"
        return f"{origin}: {field}: unknown field ({hint})"
    if err["type"] == "missing":
        return f"{origin}: {field}: required field is missing"
    if err["type"] == "value_error":  # a check across fields: its message names them and the fix
        return f"{origin}: {field}: {err['msg'].removeprefix('Value error, ')}"
    return f"{origin}: {field}: {err['msg']} (got {err.get('input')!r})"


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that holds the field at `loc` (to list its known fields in a hint)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        if part in ("text", "image-folder", "idx", "digits"):
            current = {"text": TextData, "image-folder": ImageFolderData, "idx": IdxData, "digits": DigitsData}[part]
            continue
        field = current.model_fields.get(part) if isinstance(current, type) and issubclass(current, BaseModel) else None
        if field is None:
            return None
        current = _first_model(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _first_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def recipe_for_model(source: str, overrides: list[str] | None = None) -> Recipe:
    """A recipe that only names a text model: offline English text (docstrings) as data, for analyses."""
    slug = "".join(c if c.isalnum() else "-" for c in source).strip("-")
    text = {"kind": "text", "source": "docstrings", "limit": 512, "max_length": 128}
    raw = {"name": f"analyze-{slug}", "model": {"source": source}, "data": {"train": [text], "eval": [text]}}
    return _validated(raw, overrides, f"model {source}")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; any problem is a one-line RecipeError."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"recipe {path} is a directory; give the recipe's YAML file (the files in recipes/ are examples)")
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist (the files in recipes/ are examples)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path} is not UTF-8 text (byte {exc.start}); save the recipe as UTF-8") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({_yaml_problem(exc)})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections (name, model, data, ...)")
    return _validated(raw, overrides, str(path))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What YAML objects to, and where: `line 3, column 7: mapping values are not allowed here`."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or summary(exc)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def _validated(raw: dict, overrides: list[str] | None, origin: str) -> Recipe:
    for assignment in overrides or []:
        apply_override(raw, assignment)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(_explain(exc, origin)) from None


def reference_markdown() -> str:
    """The recipe reference (every section and field, its type, default and meaning) from the models."""
    sections: list[tuple[str, type[BaseModel]]] = [("(top level)", Recipe)]
    for name, field in Recipe.model_fields.items():
        model = _first_model(field.annotation)
        if model is not None:
            sections.append((name, model))
    sections += [(f"data source `kind: {tag}`", m) for tag, m in (
        ("text", TextData), ("image-folder", ImageFolderData), ("idx", IdxData), ("digits", DigitsData))]
    out = ["# Recipe reference", "", "Generated from the pydantic models by `replacer recipe-reference`.", ""]
    for title, model in sections:
        out += [f"## {title}", "", "| field | type | default | meaning |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            value = None if field.is_required() else field.get_default(call_default_factory=True)
            default = "required" if field.is_required() else "see its section" if isinstance(value, BaseModel) else repr(value)
            kind = " ".join([_type_name(field.annotation), *_bounds(field.metadata)])
            cells = [f"`{name}`", f"`{kind}`", f"`{default}`", field.description or ""]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        out.append("")
    return "\n".join(out)


def _bounds(metadata: Any) -> list[str]:
    """Bounds of a field (`> 0`, `<= 1`) from its pydantic constraints."""
    bounds = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
    return [f"{sign} {getattr(m, attr)}" for m in metadata for attr, sign in bounds if getattr(m, attr, None) is not None]


def _type_name(annotation: Any) -> str:
    """A readable type: `int > 0 | None`, `'mse' | 'cosine'`, `list[int | str]`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return " ".join([_type_name(args[0]), *_bounds(args[1:])])
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, UnionType):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))