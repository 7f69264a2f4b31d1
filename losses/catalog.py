"""The loss registry: every loss's name, parameters and facts, importable without TensorFlow.

Each entry names its implementation (``"losses.<file>:<Class>"``, one loss per file, imported on
first use), so validating a config needs no TensorFlow. Its facts:

- ``min_K``: the fewest images per class a batch must hold (pair and triplet losses need 2);
- ``min_P``: the fewest classes per batch (pair and triplet losses need negatives: 2);
- ``uses_proxies``: the loss learns one vector per class (a Keras layer whose
  ``trainable_variables`` train with the model); building it needs ``num_classes``;
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

LOSSES = Registry("loss")

#: The distances of the distance-based losses (``losses.distances.pairwise_distances``).
METRICS = ("euclidean", "squared_euclidean", "cosine")


def metric_param(default: str = "euclidean") -> Param:
    """The ``metric`` key of the distance-based losses."""
    return Param(str, default, "Distance between embeddings.", choices=METRICS)


LOSSES.register(
    "semi_hard_triplet",
    "losses.semi_hard_triplet:SemiHardTripletLoss",
    params={
        "margin": Param(float, 1.0, "Margin between positive and negative distances.", min=0),
        "metric": metric_param(),
    },
    doc="Triplet loss with semi-hard negatives (FaceNet); tfa.losses.TripletSemiHardLoss.",
    min_K=2,
    min_P=2,
    uses_proxies=False,
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
    "losses.batch_hard_triplet:BatchHardTripletLoss",
    params={
        "margin": Param(float, 0.3, "Margin (ignored with soft_margin).", min=0),
        "soft_margin": Param(bool, False, "Use log(1 + exp(x)) instead of max(margin + x, 0)."),
        "metric": metric_param(),
    },
    doc="Triplet loss on each anchor's hardest positive and hardest negative (Hermans et al.).",
    min_K=2,
    min_P=2,
    uses_proxies=False,
    geometry="metric",
)

LOSSES.register(
    "batch_all_triplet",
    "losses.batch_all_triplet:BatchAllTripletLoss",
    params={
        "margin": Param(float, 0.2, "Margin between positive and negative distances.", min=0),
        "metric": metric_param(),
    },
    doc="Triplet loss over all triplets of the batch, averaged over the non-zero ones.",
    min_K=2,
    min_P=2,
    uses_proxies=False,
    geometry="metric",
)

LOSSES.register(
    "contrastive",
    "losses.contrastive:ContrastiveLoss",
    params={
        "pos_margin": Param(float, 0.0, "Same-class pairs closer than this cost nothing.", min=0),
        "neg_margin": Param(float, 1.0, "Other-class pairs farther than this cost nothing.", min=0),
        "metric": metric_param(),
    },
    doc="Contrastive loss on all pairs (pytorch-metric-learning's conventions).",
    min_K=2,
    min_P=2,
    uses_proxies=False,
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
    geometry="cosine",
)

LOSSES.register(
    "multi_similarity",
    "losses.multi_similarity:MultiSimilarityLoss",
    params={
        "alpha": Param(float, 2.0, "Scale of the positive term.", min=0, min_exclusive=True),
        "beta": Param(float, 50.0, "Scale of the negative term.", min=0, min_exclusive=True),
        "base": Param(float, 0.5, "Similarity margin lambda.", min=-1, max=1),
        "epsilon": Param(
            float,
            0.1,
            "Mining margin: pairs this far inside the hardest pair of the other kind are dropped.",
            min=0,
        ),
    },
    doc="Multi-similarity loss with its hard-pair mining (Wang et al. 2019).",
    min_K=2,
    min_P=2,
    uses_proxies=False,
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
