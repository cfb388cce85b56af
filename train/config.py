"""The training configuration: one dataclass, filled from YAML and `--key=value` overrides.

Defaults are the CoCo DistillNet paper's settings (Adam with weight decay 2e-4, poly learning rate with power
0.9, discriminator lr 2e-4, 200 epochs, batch 8, 512x512 inputs, random flips, paraphrasers trained with SGD
and momentum 0.9). `configs/authors_code.yaml` switches to the authors' public code (grayscale input, 256x256,
student lr 3e-3 stepped down x0.1 every 50 epochs inside the poly schedule, discriminator lr 3e-5).

Learning rate of teacher, student and paraphraser: the paper's text says "set to 0.03 initially and divided by 10
after every 50 epochs" on top of the poly policy, which is the `poly_step` schedule here. Adam at 0.03 is an
unusually large step; the authors' code uses 3e-3, and `configs/authors_code.yaml` carries that value.

Precedence: dataclass defaults < YAML file < command line. Unknown keys and values of the wrong type are errors
that name the key, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from .config_checks import ConfigError, UniqueKeyLoader, check_cacheable, check_values  # noqa: F401 (ConfigError: re-exported)

STAGES = ("teacher", "paraphraser", "student", "eval")  # in the order 'all' runs them


def _f(default, group: str, help: str, choices: Sequence[str] | None = None):
    # group says which stage's checkpoint a key belongs to: resuming that stage with a different value is refused.
    # "run" keys steer this invocation only (where to write, when to stop, progress bars) and may change freely.
    metadata = {"group": group, "help": help, "choices": choices}
    if isinstance(default, (list, dict)):  # mutable defaults: a fresh copy per config
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


@dataclass
class TrainConfig:
    # --- what to run, where ---
    stage: str = _f("all", "run", "which stage(s) to run: one of teacher, paraphraser, student, eval, a "
                                  "comma-separated list of them (e.g. 'student,eval'), or 'all' (every one, in order)")
    run_dir: str = _f("runs/default", "run", "folder for checkpoints, summary.csv, plots and the resolved config")
    resume: bool = _f(False, "run", "continue each stage from its last.pt; finished stages are skipped")
    overwrite: bool = _f(False, "run", "start a stage afresh even if its last.pt exists")
    student_name: str = _f("student", "run", "sub-folder of run_dir for the student stage (one per ablation row)")
    eval_students: str = _f("", "run", "comma-separated student sub-folders the eval stage scores "
                                       "(empty: student_name)")
    teacher_checkpoint: str = _f("", "run", "teacher weights for later stages (empty: run_dir/teacher/best.pt)")
    paraphraser_checkpoint: str = _f("", "run", "paraphraser weights (empty: run_dir/paraphraser/best.pt)")
    trust_model_code: list = _f([], "run", "import paths 'package.module:factory' a checkpoint may name (and so "
                                           "import and call) besides teacher_model and student_model; a "
                                           "checkpoint never runs code on its own")
    device: str = _f("auto", "run", "'auto' (cuda:LOCAL_RANK when available, else cpu), 'cpu' or 'cuda'")
    progress: bool = _f(True, "run", "tqdm bar per epoch on rank 0")
    curves_every_s: float = _f(30.0, "run", "redraw curves.png at most every this many seconds (0: every "
                                            "epoch); always after the last epoch")
    num_workers: int = _f(2, "run", "DataLoader worker processes per rank")
    save_every_iters: int = _f(500, "run", "also write last.pt every N iterations inside an epoch (0: epoch ends only)")
    stop_after_iters: int = _f(0, "run", "debugging: stop abruptly, without saving, after N iterations "
                                         "of this invocation (0: never); simulates a killed job")
    num_overlays: int = _f(4, "run", "validation patches drawn in overlays_*.png")
    threads: int = _f(0, "run", "torch CPU threads per process (0: OMP_NUM_THREADS where set, else the "
                                "machine's cores; 1 per process under torchrun on the CPU). On a busy machine "
                                "fewer threads than cores can be faster")
    keep_freed_memory: bool = _f(True, "run", "CPU, glibc: serve large tensors from malloc's heap and keep freed "
                                              "memory for the next step, instead of fresh zero-filled pages "
                                              "each time (cocofast/cpu_memory.py: about 1.4x faster steps at "
                                              "512x512, about 20 % more peak memory); false: the system default")

    # --- data ---
    seed: int = _f(0, "all", "seeds weights, data order and augmentation; data order is a function of (seed, epoch)")
    data_seed: int = _f(0, "all", "seeds the synthetic data set and the labelled subset, so runs with different "
                                  "`seed` train and test on the same patches")
    dataset: str = _f("synthetic", "all", "'synthetic' (built-in generated patches), 'folder' (images + masks) or "
                                          "'slides' (whole slides with annotations, docs/slides.md)",
                      ("synthetic", "folder", "slides"))
    data_root: str = _f("", "all", "folder dataset: root holding train/, val/ (and optionally test/), each with "
                                   "images/ and masks/ paired by file stem")
    mask_values: str = _f("", "all", "folder dataset: mask value -> class, e.g. '0:0,255:1' (empty: value = class)")
    patch_size: int = _f(0, "all", "folder dataset: cut images into patches of this side before resizing "
                                   "(paper: 1024 from 2048² images; 0: whole images)")
    patch_stride: int = _f(0, "all", "folder dataset: patch stride (0: patch_size, no overlap)")
    train_samples: int = _f(800, "all", "synthetic data and slides: number of training patches (per epoch)")
    val_samples: int = _f(100, "all", "synthetic data: number of validation patches")
    # Slides (cocofast.data.slide_dataset): data_root is a folder of slides with annotations beside them, or a
    # CSV list file; patches of image_size pixels are read at slide_mpp, which checkpoints carry to segment.
    slide_mpp: float = _f(0.0, "all", "slides: µm per pixel the patches are read at (required; segment and "
                                      "predict default to it)")
    slide_classes: str = _f("", "all", "slides: annotation class name -> class, e.g. 'Tumor:1,Stroma:2'")
    slide_split: str = _f("", "all", "slides: split file, CSV 'slide,split' (empty: DATA_ROOT/split.csv or the "
                                     "list file's split column)")
    slide_unannotated: int = _f(0, "all", "slides: class of tissue no annotation covers (255: ignored)")
    slide_balance: bool = _f(False, "all", "slides: draw training patches class by class, not by area")
    tissue_method: str = _f("saturation", "all", "slides: tissue measure of the Otsu mask, 'saturation' or 'od'",
                            ("saturation", "od"))
    tissue_threshold: float = _f(0.0, "all", "slides: tissue threshold on that measure (0: Otsu's, per slide)")
    image_size: int = _f(512, "all", "square input size in pixels (paper: 512)")
    in_channels: int = _f(3, "all", "3 for RGB, 1 for grayscale (authors' code)")
    num_classes: int = _f(2, "all", "segmentation classes (0 = normal, 1 = cancer)")
    flips: bool = _f(True, "all", "random horizontal and vertical flips of training patches")
    # Data-owned keys (cocofast/data): defaults keep today's behaviour; the data sets take them as constructor
    # arguments (normalise=, augment=Augmentation(hed=, brightness=, contrast=)) and segment reads 'normalise' back.
    normalise: str = _f("range", "all", "stored pixels -> network input: 'range' (x / dtype max), 'range:LOW:HIGH', "
                                        "'percentile:P:Q' (per image) or 'meanstd:M,..:S,..' (docs/data.md)")
    hed_jitter: float = _f(0.0, "all", "HED stain jitter of training patches, in [0, 1) (Tellez et al. 2018; 0.05 "
                                       "light; 0: off)")
    brightness: float = _f(0.0, "all", "brightness jitter of training patches, factor in U(1 - x, 1 + x) (0: off)")
    contrast: float = _f(0.0, "all", "contrast jitter of training patches, factor in U(1 - x, 1 + x) (0: off)")
    batch_size: int = _f(8, "all", "global batch size, split evenly over the processes")
    eval_batch_size: int = _f(8, "run", "per-process batch size for evaluation")

    # --- networks ---
    teacher_model: str = _f("fanet", "all", "teacher network: a name in cocofast.models or an import path "
                                            "'package.module:factory' (docs/own-networks.md)")
    teacher_model_kwargs: dict = _f({}, "all", "arguments of the teacher's factory (a mapping; for built-in "
                                               "networks added to in_channels, num_classes, width)")
    teacher_taps: list = _f([], "all", "dotted module paths of the teacher's (shallow, deep) taps (empty: "
                                       "the built-in network's own)")
    teacher_width: float = _f(1.0, "all", "teacher channel-width multiplier (1.0 = the paper's network)")
    student_model: str = _f("mobile_unet", "paraphraser", "student network: a name in cocofast.models or an "
                                                          "import path 'package.module:factory'")
    student_model_kwargs: dict = _f({}, "paraphraser", "arguments of the student's factory (a mapping)")
    student_taps: list = _f([], "paraphraser", "dotted module paths of the student's (shallow, deep) taps "
                                               "(empty: the built-in network's own)")
    teacher_chain: list = _f([], "student", "module paths of the teacher's chain of taps for graph losses "
                                            "(empty: the built-in network's graph_tap_paths)")
    student_chain: list = _f([], "student", "module paths of the student's chain of taps for graph losses")
    teacher_input_divisor: int = _f(0, "all", "a teacher given by import path: what its input's H and W must be "
                                              "divisible by (0: any size; built-in networks know their own)")
    student_input_divisor: int = _f(0, "paraphraser", "the same for a student given by import path")
    student_width: float = _f(1.0, "paraphraser", "student channel-width multiplier")

    # --- optimisation (poly lr; 'poly_step' also multiplies by lr_step_gamma every lr_step_epochs epochs) ---
    lr_schedule: str = _f("poly_step", "all", "'poly', 'poly_step' or 'constant'", ("poly", "poly_step", "constant"))
    lr_power: float = _f(0.9, "all", "poly power: lr = base * (1 - iter / max_iter) ** power")
    lr_step_epochs: int = _f(50, "all", "poly_step: epochs between steps")
    lr_step_gamma: float = _f(0.1, "all", "poly_step: factor at each step")
    weight_decay: float = _f(2e-4, "all", "weight decay of every optimiser")
    amp: str = _f("auto", "all", "'auto' (bf16 on CUDA with bf16, fp16 on older CUDA, off on CPU), 'bf16', "
                                 "'fp16' or 'off'", ("auto", "bf16", "fp16", "off"))
    deterministic: bool = _f(False, "all", "torch.use_deterministic_algorithms and no cuDNN autotuning")

    teacher_epochs: int = _f(200, "teacher", "teacher training epochs")
    teacher_lr: float = _f(0.03, "teacher", "teacher Adam learning rate")

    paraphraser_epochs: int = _f(200, "paraphraser", "paraphraser training epochs")
    paraphraser_optimizer: str = _f("sgd", "paraphraser", "'sgd' (the paper, with paraphraser_momentum) or "
                                                         "'adam': its per-weight step does not grow with the "
                                                         "teacher's feature scale, so one lr (1e-3) trains on "
                                                         "every teacher", ("sgd", "adam"))
    paraphraser_lr: float = _f(0.03, "paraphraser", "paraphraser learning rate")
    paraphraser_momentum: float = _f(0.9, "paraphraser", "paraphraser SGD momentum")
    paraphraser_clip: float = _f(0.0, "paraphraser", "cap on the paraphrasers' gradient norm per step (0: none, "
                                                     "the paper)")
    paraphraser_scale_free: bool = _f(False, "paraphraser", "train each paraphraser in units of its teacher tap's "
                                                           "mean square (reconstruction MSE / ms, bias steps * "
                                                           "ms): the same SGD path whatever the teacher's feature "
                                                           "scale, so paraphraser_lr means the same on every "
                                                           "teacher; val_rec is then relative (1 = all-zero "
                                                           "output). false (default): plain MSE on raw taps (the "
                                                           "paper), whose safe lr shrinks with the taps' square")

    student_epochs: int = _f(200, "student", "student training epochs")
    student_lr: float = _f(0.03, "student", "student Adam learning rate")
    teacher_cache: bool = _f(False, "run", "student stage: compute the frozen teacher's features (logits, taps, "
                                           "paraphrased taps, chain) once per training patch and flip variant "
                                           "and replay them, bit-identically, instead of running the teacher "
                                           "every step; needs hed_jitter, brightness and contrast at 0")
    teacher_cache_dir: str = _f("", "run", "folder of teacher caches, one sub-folder per teacher, paraphrasers "
                                           "and data (empty: run_dir/teacher_cache); runs that share a teacher "
                                           "may share it")
    disc_lr: float = _f(2e-4, "student", "discriminator Adam learning rate (poly schedule, no steps)")
    disc_beta1: float = _f(0.9, "student", "discriminator Adam beta1")
    disc_beta2: float = _f(0.99, "student", "discriminator Adam beta2")
    disc_width: float = _f(1.0, "student", "discriminator channel-width multiplier (1.0 = 64..512 channels)")

    # --- distillation: any registered losses with weights, the critic, and the supervised term ---
    losses: str = _f("coco", "student", "distillation losses as 'name[:weight][:key=value...],...' from "
                                        "cocofast.losses (e.g. 'coco', 'kd:1:T=2,at', 'graph_flow,kd'; weight "
                                        "defaults to the loss's paper weight); 'none' trains the student alone")
    loss_modules: str = _f("", "student", "comma-separated Python modules imported before `losses` is read, "
                                          "each registering its own losses with cocofast.losses.register_loss")
    supervised_loss: str = _f("ce", "student", "'ce' (cross-entropy) or 'focal_dice' (0.5 focal + 0.5 dice, "
                                               "EMKD's)", ("ce", "focal_dice"))
    use_paraphraser: bool = _f(True, "student", "losses that read taps see the paraphraser encodings of the "
                                                "teacher's taps (FSP and CPKD need them: equal channels)")
    labelled_fraction: float = _f(1.0, "student", "semi-supervised: the fraction of training patches whose masks "
                                                  "the student may use; below 1, each batch is half labelled, "
                                                  "half unlabelled, and CE sees only the labelled half")
    adversarial: bool = _f(True, "student", "adversarial distillation with a WGAN-GP discriminator")
    adv_weight: float = _f(0.1, "student", "beta: weight of the student's adversarial term L_g")
    gp_weight: float = _f(10.0, "student", "gradient-penalty weight in the discriminator loss")
    gp_every: int = _f(1, "student", "compute the gradient penalty on every k-th critic step only, at weight "
                                     "k * gp_weight (lazy regularisation, StyleGAN2); 1 is the paper. The "
                                     "penalty's double backward is most of the critic's cost")
    drift_weight: float = _f(0.0, "student", "drift penalty eps * E[D(real)^2] in the discriminator loss, keeping "
                                             "its scores bounded (progressive GANs use 1e-3; the paper has none)")
    disc_input: str = _f("probs_image", "student", "'probs_image' ([softmax, image], paper) or 'logits' "
                                                   "(authors' code)", ("probs_image", "logits"))
    similarity_backend: str = _f("auto", "student", "backend of the losses built on the CMSS similarity op "
                                                    "(coco, skd_pairwise, cmss, graph_flow)")
    pixel_relation_backend: str = _f("auto", "student", "backend of the losses built on the pixel-relation op "
                                                        "(cpkd)")
    kernel_self_check: bool = _f(True, "run", "on CUDA, check each fused-kernel class against the float64 gram "
                                              "path on its first batch (cocofast.ops.selfcheck)")

    # ---------------------------------------------------------------------------------------------------
    def stages(self) -> list[str]:
        """The stages to run, in the order they must run."""
        if self.stage.strip() == "all":
            return list(STAGES)
        names = [s.strip() for s in self.stage.split(",") if s.strip()]
        bad = [n for n in names if n not in STAGES]
        if bad or not names:
            raise ConfigError(f"config key 'stage': {self.stage!r} is not 'all' or a comma-separated list of "
                              f"{', '.join(STAGES)}")
        return sorted(set(names), key=STAGES.index)

    def validate(self) -> "TrainConfig":
        self.stages()
        check_values(self)  # finite numbers, known networks, student folder names (train/config_checks.py)
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(f"config key '{f.name}': {value!r} is not one of {', '.join(choices)}")
        positive = ("batch_size", "eval_batch_size", "image_size", "in_channels", "teacher_epochs",
                    "paraphraser_epochs", "student_epochs", "train_samples", "val_samples", "lr_step_epochs",
                    "gp_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"config key '{name}': must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 2:
            raise ConfigError(f"config key 'num_classes': must be >= 2, got {self.num_classes}")
        for name in ("num_workers", "threads", "teacher_input_divisor", "student_input_divisor", "save_every_iters", "stop_after_iters", "num_overlays", "patch_size",
                     "patch_stride"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config key '{name}': must be >= 0, got {getattr(self, name)}")
        if self.dataset in ("folder", "slides") and not self.data_root:
            raise ConfigError(f"config key 'data_root': required when dataset is '{self.dataset}'")
        self.slide_options()  # raises on a malformed class mapping or resolution
        self.mask_mapping()  # raises on a malformed mapping
        self.data_options()  # raises on a malformed normalisation or augmentation strength
        self.check_backends()
        self.loss_specs()  # raises on an unknown loss, key or a malformed weight
        if not 0 < self.labelled_fraction <= 1:
            raise ConfigError(f"config key 'labelled_fraction': must be in (0, 1], got {self.labelled_fraction}")
        if self.teacher_cache:
            check_cacheable(self)
        if self.resume and self.overwrite:
            raise ConfigError("config keys 'resume' and 'overwrite' exclude each other")
        return self

    def data_options(self) -> dict[str, Any]:
        """{'normalise': Normalisation, 'augment': Augmentation} for the training data set (flips included)."""
        from cocofast.data import Augmentation, Normalisation

        try:
            norm = Normalisation.parse(self.normalise)
        except ValueError as err:
            raise ConfigError(f"config key 'normalise': {err}") from None
        for name in ("hed_jitter", "brightness", "contrast"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"config key '{name}': must be in [0, 1), got {getattr(self, name)}")
        if self.hed_jitter > 0 and self.in_channels != 3:
            raise ConfigError(f"config key 'hed_jitter': stain jitter needs RGB input (in_channels 3), got "
                              f"in_channels {self.in_channels}")
        augment = Augmentation(flips=self.flips, hed=self.hed_jitter, brightness=self.brightness,
                               contrast=self.contrast)
        return {"normalise": norm, "augment": augment}

    def slide_options(self) -> dict[str, Any]:
        """SlideDataset arguments of the slide keys (checked whatever the data set, so a typo fails early)."""
        from cocofast.data.annotations import IGNORE, parse_classes

        try:
            classes = parse_classes(self.slide_classes)
        except ValueError as err:
            raise ConfigError(f"config key 'slide_classes': {err}") from None
        for name, value in classes.items():
            if not 0 <= value < self.num_classes:
                raise ConfigError(f"config key 'slide_classes': {name!r} -> {value}, outside classes "
                                  f"0..{self.num_classes - 1}")
        if not (0 <= self.slide_unannotated < self.num_classes or self.slide_unannotated == IGNORE):
            raise ConfigError(f"config key 'slide_unannotated': a class 0..{self.num_classes - 1} or {IGNORE} "
                              f"(ignored), got {self.slide_unannotated}")
        if self.dataset == "slides":
            if not self.slide_mpp > 0:
                raise ConfigError("config key 'slide_mpp': required for slides (µm per pixel of the patches, e.g. "
                                  "0.5 for 20x, 1.0 for 10x)")
            if self.patch_size:
                raise ConfigError("config key 'patch_size': slides are read at slide_mpp in image_size patches; "
                                  "leave patch_size 0 and choose the resolution with slide_mpp")
        return {"classes": classes, "mpp": self.slide_mpp, "unannotated": self.slide_unannotated,
                "balance": self.slide_balance, "tissue_method": self.tissue_method,
                "tissue_threshold": self.tissue_threshold or None, "split_file": self.slide_split or None}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def group_items(self, groups: Sequence[str]) -> dict[str, Any]:
        """The keys whose value a checkpoint of a stage depends on (used to refuse a mismatched resume)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["group"] in groups}

    def mask_mapping(self) -> dict[int, int] | None:
        if not self.mask_values.strip():
            return None
        try:
            pairs = [item.split(":") for item in self.mask_values.split(",") if item.strip()]
            return {int(value): int(cls) for value, cls in pairs}
        except ValueError:
            raise ConfigError(f"config key 'mask_values': expected 'VALUE:CLASS,...' such as '0:0,255:1', "
                              f"got {self.mask_values!r}") from None

    def check_backends(self) -> None:
        """Each op family's backend against that op's own table."""
        from cocofast.ops.backends import check_backend

        for key, family in (("similarity_backend", "similarity"), ("pixel_relation_backend", "pixel_relation")):
            try:
                check_backend(family, getattr(self, key), where=f"config key '{key}'")
            except ValueError as err:
                raise ConfigError(str(err)) from None

    def import_loss_modules(self) -> None:
        import importlib

        for module in (m.strip() for m in self.loss_modules.split(",") if m.strip()):
            try:
                importlib.import_module(module)
            except Exception as err:  # the user's module: say which one and why, before any training
                raise ConfigError(f"config key 'loss_modules': cannot import {module!r}: "
                                  f"{type(err).__name__}: {err}") from None

    def loss_specs(self):
        """`losses` parsed into cocofast.losses.LossSpec entries, in the order given."""
        from cocofast.losses import parse_losses

        self.import_loss_modules()
        try:
            return parse_losses(self.losses)
        except ValueError as err:
            raise ConfigError(f"config key 'losses': {err}") from None

    def loss_names(self) -> list[str]:
        return [spec.name for spec in self.loss_specs()]

    def students_to_eval(self) -> list[str]:
        names = [s.strip() for s in self.eval_students.split(",") if s.strip()]
        return names or [self.student_name]


# ------------------------------------------------------------------------------------------------------------
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _close_names(name: str) -> str:
    import difflib

    near = difflib.get_close_matches(name, list(_FIELDS), n=3)
    return f" (did you mean {', '.join(near)}?)" if near else ""


def _coerce(key: str, value: Any, source: str) -> Any:
    """Check (YAML) or convert (command line strings) one value to the type of field `key`."""
    if key not in _FIELDS:
        raise ConfigError(f"unknown config key '{key}' in {source}{_close_names(key)}")
    kind = type(default_of(_FIELDS[key]))
    from_cli = source == "the command line"
    bad = ConfigError(f"config key '{key}' in {source}: expected {kind.__name__}, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise bad
    if kind is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if from_cli and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if kind is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string; accept it
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if kind is str:
        if isinstance(value, str):
            return value
        raise bad
    if kind is list:  # YAML: a list of names; command line: comma-separated
        if from_cli and isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return list(value)
        raise ConfigError(f"config key '{key}' in {source}: expected a list of names (YAML) or "
                          f"'a,b' (command line), got {value!r}")
    if kind is dict:  # YAML: a mapping; command line: a YAML/JSON mapping such as '{base: 16}'
        if from_cli and isinstance(value, str):
            try:
                value = yaml.safe_load(value) if value.strip() else {}
            except yaml.YAMLError:
                raise bad from None
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
        raise ConfigError(f"config key '{key}' in {source}: expected a mapping such as '{{base: 16}}', "
                          f"got {value!r}")
    raise AssertionError(f"unsupported field type {kind} for {key}")


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        # Bytes, not text: YAML reads UTF-8 and UTF-16 by their byte-order mark, and calls anything else
        # (a binary file) an unacceptable character, a YAMLError like any other syntax error.
        data = yaml.load(path.read_bytes(), Loader=UniqueKeyLoader)  # a key given twice is an error
    except OSError as err:
        raise ConfigError(f"config file {path}: cannot read it ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of key: value, got {type(data).__name__}")
    return data


def parse_args(argv: Sequence[str]) -> TrainConfig:
    """Build the config from `--config FILE` and `--key=value` / `--key value` / `--flag` arguments."""
    values: dict[str, Any] = {}
    overrides: list[tuple[str, str]] = []
    config_file = None
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: use --config FILE and --key=value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            nxt = args[i + 1] if i + 1 < len(args) else None
            is_flag = key in _FIELDS and isinstance(_FIELDS[key].default, bool)
            if nxt is not None and not nxt.startswith("--") and (not is_flag or nxt.lower() in _TRUE | _FALSE):
                value, i = nxt, i + 1
            elif is_flag:
                value = "true"
            else:
                raise ConfigError(f"argument --{key} needs a value (--{key}=VALUE)")
        if key == "config":
            if config_file is not None:  # one file: a second would silently replace the first's keys
                raise ConfigError(f"--config given twice ({config_file}, then {value}); give one file, and "
                                  f"other keys as --key=value")
            config_file = value
        else:
            overrides.append((key, value))
        i += 1
    if config_file is not None:
        for key, value in load_yaml(config_file).items():
            values[key] = _coerce(str(key), value, f"config file {config_file}")
    for key, value in overrides:
        values[key] = _coerce(key, value, "the command line")
    return TrainConfig(**values).validate()


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def describe() -> str:
    """One line per key: name, default, help (printed by `distill.py --help`)."""
    lines = []
    for f in dataclasses.fields(TrainConfig):
        lines.append(f"  {'--' + f.name + '=' + repr(default_of(f)):<34} {f.metadata['help']}")
    return "\n".join(lines)
