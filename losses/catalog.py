"""The loss registry: every loss's name, parameters and facts, importable without TensorFlow.

A loss is built from parts, as pytorch-metric-learning builds them: a **distance**
(:data:`DISTANCES`, chosen by the ``metric`` key), a **miner** (:data:`MINERS`, the ``miner`` key:
which pairs or triplets of the batch the loss sees) and the loss's formula. The registered names
are presets: a formula with its default distance and miner (``semi_hard_triplet``,
``batch_hard_triplet`` and ``batch_all_triplet`` are one triplet formula with three miners).

Each entry names its implementation (``"losses.<file>:<Class>"``, imported on first use), so
validating a config needs no TensorFlow. The entry's ``params`` are the one place of each
parameter's default: the classes read theirs from here (:func:`bind_params`). Its facts:

- ``min_K``: the fewest images per class a batch must hold (pair and triplet losses need 2);
- ``min_P``: the fewest classes per batch (pair and triplet losses need negatives: 2);
- ``uses_proxies``: the loss learns one vector per class (a Keras layer whose
  ``trainable_variables`` train with the model); building it needs ``num_classes``;
- ``takes_references``: the formula compares the batch's anchors with references other than
  the batch (a cross-batch memory, ``train.memory``); absent: the batch with itself only;
- ``geometry``: how the loss compares embeddings, and so how a trained model must be searched:
  ``cosine`` (angles: similarities of the embeddings, normalised or taken as they come) or
  ``metric`` (the distance its ``metric`` parameter names).

Registration order is the order the config reference and error messages list.
"""

from __future__ import annotations

import math

from tfcbir import UserError
from tfcbir.params import Param
from tfcbir.registry import Registry

# --- distances -----------------------------------------------------------------------------------

DISTANCES = Registry("distance")
DISTANCES.register(
    "euclidean", "losses.distances:EuclideanDistance", doc="||a - b|| (tensorflow-addons' L2)."
)
DISTANCES.register(
    "squared_euclidean",
    "losses.distances:SquaredEuclideanDistance",
    doc="||a - b||^2 (addons' squared-L2).",
)
DISTANCES.register(
    "cosine",
    "losses.distances:CosineDistance",
    doc="1 - cosine similarity (addons' angular distance).",
)

#: The distances a distance-based loss's ``metric`` may name.
METRICS = tuple(DISTANCES.names())


def metric_param(default: str = "euclidean") -> Param:
    """The ``metric`` key of the distance-based losses: the distance object they compare with."""
    return Param(str, default, "Distance between embeddings.", choices=METRICS)


# --- miners --------------------------------------------------------------------------------------
# gives: "triplets" (one negative per kept anchor-positive pair: the triplet formula averages over
# them), "pairs" (kept positive and negative pairs; as triplets, every kept positive of an anchor
# with every kept negative of it, averaged over those with a positive loss), or both.

MINERS = Registry("miner")
MINERS.register(
    "semi_hard",
    "losses.miners:SemiHardMiner",
    doc="Each positive pair's closest negative beyond the positive (FaceNet; addons' semi-hard).",
    gives=("triplets",),
)
MINERS.register(
    "batch_hard",
    "losses.miners:BatchHardMiner",
    doc="Each anchor's farthest positive and closest negative (Hermans et al.).",
    gives=("triplets", "pairs"),
)
MINERS.register(
    "all",
    "losses.miners:AllMiner",
    doc="Every positive and every negative pair (no mining).",
    gives=("pairs",),
)
MINERS.register(
    "multi_similarity",
    "losses.miners:MultiSimilarityMiner",
    params={
        "epsilon": Param(
            float,
            0.1,
            "Mining margin (multi_similarity miner): pairs this far inside the hardest pair of "
            "the other kind are dropped.",
            min=0,
        ),
    },
    doc="Pairs near the anchor's hardest pair of the other kind (Wang et al. 2019).",
    gives=("pairs",),
)

MINERS.register(
    "distance_weighted",
    "losses.miners:DistanceWeightedMiner",
    params={
        "cutoff": Param(
            float,
            0.5,
            "Distances below this count as this in the distance_weighted miner's weights "
            "(bounds their variance; the authors' 0.5).",
            min=0,
            min_exclusive=True,
        ),
        "nonzero_loss_cutoff": Param(
            float,
            1.4,
            "The distance_weighted miner draws no negative this far or farther (it would add no "
            "loss; the authors' 1.4).",
            min=0,
            min_exclusive=True,
        ),
    },
    doc="One negative per positive pair, drawn with probability 1 / q(d), q the density of "
    "distances on the unit sphere (Wu et al. 2017); seeded by the run's seed and step.",
    gives=("triplets", "pairs"),
    metric="euclidean",
)

TRIPLET_MINERS = ("semi_hard", "batch_hard", "all", "multi_similarity", "distance_weighted")
PAIR_MINERS = ("all", "batch_hard", "multi_similarity", "distance_weighted")


def miner_params(default: str, choices: tuple[str, ...]) -> dict[str, Param]:
    """The ``miner`` key (its default and the miners the formula takes) and the parameters of
    those miners (``epsilon``), declared once with the miner."""
    params = {
        "miner": Param(str, default, "Which pairs or triplets the loss sees.", choices=choices)
    }
    for name in choices:
        params.update(MINERS.get(name).params)
    return params


def check_miner_metric(params: dict, path: str) -> None:
    """A miner defined on one distance (distance_weighted: Euclidean between unit vectors) needs
    the loss's ``metric`` to be it."""
    if "miner" not in params:
        return
    needed = MINERS.get(params["miner"]).meta.get("metric")
    if needed is not None and params.get("metric") != needed:
        raise UserError(
            f"{path}.miner: {params['miner']} draws by Euclidean distances between unit vectors; "
            f"set {path}.metric: {needed} (it is {params.get('metric')})"
        )


def _one_negative_for_soft_margin(params: dict, path: str) -> None:
    """The soft margin is summed triplet by triplet: only a miner that picks one negative per
    positive pair keeps that O(B^2)."""
    if params["soft_margin"] and "triplets" not in MINERS.get(params["miner"]).meta["gives"]:
        picks = ", ".join(n for n in MINERS.names() if "triplets" in MINERS.get(n).meta["gives"])
        raise UserError(
            f"{path}.soft_margin: true needs a miner that picks one negative per positive pair "
            f"({picks}); {path}.miner is {params['miner']}"
        )


# --- losses --------------------------------------------------------------------------------------

LOSSES = Registry("loss")


def registered_name(registry: Registry, cls: type) -> str:
    """The name under which ``registry`` lists the class ``cls`` ("" if none): a class's name is
    its registry key, written once, in the catalog."""
    target = f"{cls.__module__}:{cls.__qualname__}"
    for name in registry.names():
        if registry.get(name).target == target:
            return name
    return ""


def bind_params(spec: dict[str, Param], args: tuple, kwargs: dict, owner: str) -> tuple[dict, dict]:
    """A class's parameters from its catalog ``spec``: ``args`` in the spec's order and the
    ``kwargs`` the spec names, the rest at the spec's defaults, converted to the spec's types
    (``margin=1`` is 1.0). Returns (values, the kwargs the spec does not name)."""
    if len(args) > len(spec):
        raise TypeError(
            f"{owner} takes at most {len(spec)} positional parameters ({', '.join(spec)})"
        )
    values = dict(zip(spec, args))
    rest = {}
    for key, value in kwargs.items():
        if key not in spec:
            rest[key] = value
        elif key in values:
            raise TypeError(f"{owner} got {key} twice")
        else:
            values[key] = value
    for key, param in spec.items():
        value = values.get(key, param.default)
        if param.type in (float, int, bool) and value is not None:
            value = param.type(value)
        values[key] = value
    return {key: values[key] for key in spec}, rest


LOSSES.register(
    "semi_hard_triplet",
    "losses.triplet:SemiHardTripletLoss",
    params={
        "margin": Param(float, 1.0, "Margin between positive and negative distances.", min=0),
        "metric": metric_param(),
        **miner_params("semi_hard", TRIPLET_MINERS),
    },
    doc="Triplet loss with semi-hard negatives (FaceNet); tfa.losses.TripletSemiHardLoss.",
    min_K=2,
    min_P=2,
    uses_proxies=False,
    takes_references=True,
    geometry="metric",
)

LOSSES.register(
    "angular",
    "losses.angular:AngularLoss",
    params={
        "alpha": Param(
            float,
            45.0,
            "Angle bound in degrees (the paper reports 36 to 55 working well).",
            min=0,
            max=90,
            min_exclusive=True,
            max_exclusive=True,
        ),
        "l2_reg": Param(
            float, 0.0, "Weight of the embeddings' squared-norm penalty, as in npair.", min=0
        ),
    },
    doc="Angular loss, N-pair form (Wang et al. 2017).",
    min_K=2,
    min_P=2,
    uses_proxies=False,
    geometry="cosine",
)

LOSSES.register(
    "batch_hard_triplet",
    "losses.triplet:BatchHardTripletLoss",
    params={
        "margin": Param(float, 0.3, "Margin (ignored with soft_margin).", min=0),
        "soft_margin": Param(bool, False, "Use log(1 + exp(x)) instead of max(margin + x, 0)."),
        "metric": metric_param(),
        **miner_params("batch_hard", TRIPLET_MINERS),
    },
    doc="Triplet loss on each anchor's hardest positive and hardest negative (Hermans et al.).",
    check=_one_negative_for_soft_margin,
    min_K=2,
    min_P=2,
    uses_proxies=False,
    takes_references=True,
    geometry="metric",
)

LOSSES.register(
    "batch_all_triplet",
    "losses.triplet:BatchAllTripletLoss",
    params={
        "margin": Param(float, 0.2, "Margin between positive and negative distances.", min=0),
        "metric": metric_param(),
        **miner_params("all", TRIPLET_MINERS),
    },
    doc="Triplet loss over all triplets of the batch, averaged over the non-zero ones.",
    min_K=2,
    min_P=2,
    uses_proxies=False,
    takes_references=True,
    geometry="metric",
)

LOSSES.register(
    "contrastive",
    "losses.contrastive:ContrastiveLoss",
    params={
        "pos_margin": Param(float, 0.0, "Same-class pairs closer than this cost nothing.", min=0),
        "neg_margin": Param(float, 1.0, "Other-class pairs farther than this cost nothing.", min=0),
        "metric": metric_param(),
        **miner_params("all", PAIR_MINERS),
    },
    doc="Contrastive loss on all pairs (pytorch-metric-learning's conventions).",
    min_K=2,
    min_P=2,
    uses_proxies=False,
    takes_references=True,
    geometry="metric",
)

LOSSES.register(
    "lifted_structure",
    "losses.lifted_structure:LiftedStructureLoss",
    params={
        "margin": Param(float, 1.0, "Margin (alpha in the paper).", min=0),
        "metric": metric_param(),
    },
    doc="Lifted structured loss, smooth form (Oh Song et al. 2016).",
    min_K=2,
    min_P=2,
    uses_proxies=False,
    geometry="metric",
)

LOSSES.register(
    "npair",
    "losses.npair:NPairLoss",
    params={
        "l2_reg": Param(
            float,
            0.002,
            "Weight of the embeddings' squared-norm penalty (lambda; tf.contrib's reg_lambda).",
            min=0,
        ),
    },
    doc="Multi-class N-pair loss on inner products, with its L2 penalty (Sohn 2016).",
    min_K=2,
    min_P=2,
    uses_proxies=False,
    takes_references=True,
    geometry="cosine",
)

LOSSES.register(
    "multi_similarity",
    "losses.multi_similarity:MultiSimilarityLoss",
    params={
        "alpha": Param(float, 2.0, "Scale of the positive term.", min=0, min_exclusive=True),
        "beta": Param(float, 50.0, "Scale of the negative term.", min=0, min_exclusive=True),
        "base": Param(float, 0.5, "Similarity margin lambda.", min=-1, max=1),
        **miner_params("multi_similarity", ("multi_similarity", "all", "batch_hard")),
    },
    doc="Multi-similarity loss with its hard-pair mining (Wang et al. 2019).",
    min_K=2,
    min_P=2,
    uses_proxies=False,
    takes_references=True,
    geometry="cosine",
)

LOSSES.register(
    "ntxent",
    "losses.ntxent:NTXentLoss",
    params={
        "temperature": Param(
            float,
            0.07,
            "Softmax temperature tau (pml's default; SimCLR used 0.1 to 0.5).",
            min=0,
            min_exclusive=True,
        ),
    },
    doc="NT-Xent / supervised InfoNCE on cosine similarities (pytorch-metric-learning's form).",
    min_K=2,
    min_P=2,
    uses_proxies=False,
    geometry="cosine",
)

LOSSES.register(
    "proxy_anchor",
    "losses.proxy_anchor:ProxyAnchorLoss",
    params={
        "alpha": Param(float, 32.0, "Scale.", min=0, min_exclusive=True),
        "margin": Param(float, 0.1, "Margin delta.", min=0),
        "proxy_lr_multiplier": Param(
            float,
            100.0,
            "The proxies' learning rate is the model's times this (the authors use 100).",
            min=0,
            min_exclusive=True,
        ),
    },
    doc="Proxy-anchor loss, one learned proxy per class (Kim et al. 2020).",
    min_K=1,
    min_P=1,
    uses_proxies=True,
    geometry="cosine",
)

LOSSES.register(
    "arcface",
    "losses.arcface:ArcFaceLoss",
    params={
        "scale": Param(float, 64.0, "Logit scale s.", min=0, min_exclusive=True),
        "margin": Param(
            float,
            0.5,
            "Additive angular margin m, in radians.",
            min=0,
            max=math.pi / 2,
            max_exclusive=True,
        ),
    },
    doc="ArcFace additive angular margin softmax, one learned weight per class (Deng et al.).",
    min_K=1,
    min_P=1,
    uses_proxies=True,
    geometry="cosine",
)


# --- image-text losses (dual encoders) -----------------------------------------------------------
# kind="image_text": called as loss(image_embeddings, text_embeddings, groups) on a batch of
# image-caption pairs; they need a text tower (model.text.tower). An image loss of the entries
# above may be added to them, weighted (``image_loss``, resolved by losses.resolve_image_loss).


def image_loss_param() -> Param:
    """The ``image_loss`` key of the image-text losses."""
    return Param(
        dict,
        None,
        'An image loss added to this one, on the image embeddings: {"name": <an image loss>, '
        '"weight": 1.0, <its parameters>}; null: none.',
        nullable=True,
    )


def _clip_scale_ok(params: dict, path: str) -> None:
    """The initial logit scale 1 / temperature must lie under the clamp: the clamp acts only
    after an update, so a fixed temperature above it would never be clamped."""

    scale = 1.0 / params["temperature"]
    if scale > params["max_logit_scale"]:
        raise UserError(
            f"{path}.temperature: {params['temperature']:g} starts the logit scale at {scale:g}, "
            f"above {path}.max_logit_scale {params['max_logit_scale']:g}; raise the temperature "
            f"to at least {1.0 / params['max_logit_scale']:g} or max_logit_scale"
        )


LOSSES.register(
    "clip",
    "losses.clip:ClipLoss",
    params={
        "temperature": Param(
            float,
            0.07,
            "Initial temperature: the logit scale starts at 1 / temperature (CLIP: 0.07).",
            min=0,
            min_exclusive=True,
        ),
        "max_logit_scale": Param(
            float,
            100.0,
            "The logit scale is clamped at this after every update (CLIP: 100); "
            "1 / temperature may not start above it.",
            min=1,
        ),
        "learn_temperature": Param(bool, True, "Learn the temperature; false keeps it fixed."),
        "image_loss": image_loss_param(),
    },
    doc="CLIP: symmetric image-text cross-entropy with a learned temperature (open_clip's ClipLoss).",
    check=_clip_scale_ok,
    min_K=1,
    min_P=1,
    uses_proxies=False,
    geometry="cosine",
    kind="image_text",
)

LOSSES.register(
    "siglip",
    "losses.siglip:SigLipLoss",
    params={
        "logit_scale": Param(
            float,
            10.0,
            "Initial temperature t = exp(t') multiplying the cosines (SigLIP: 10).",
            min=0,
            min_exclusive=True,
        ),
        "bias": Param(float, -10.0, "Initial bias b added to the logits (SigLIP: -10)."),
        "image_loss": image_loss_param(),
    },
    doc="SigLIP: pairwise sigmoid image-text loss with learned temperature and bias (big_vision).",
    min_K=1,
    min_P=1,
    uses_proxies=False,
    geometry="cosine",
    kind="image_text",
)
