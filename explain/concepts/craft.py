"""CRAFT: concept extraction, importance, attribution maps and recursion (Fel et al. 2023, "CRAFT: Concept
Recursive Activation FacTorization for Explainability", CVPR).

The model is split into ``input_to_latent`` (g, activations >= 0, e.g. up to the layer before global pooling)
and ``latent_to_logit`` (h). ``fit`` crops the images, resizes every crop to the input size, takes the spatial
mean of its activations and factorizes them, ``A ~= U W`` with NMF: the rows of ``W`` [r, c] are the concepts
(the "concept bank"), ``U`` [n, r] the crops' coefficients. Then:

* ``transform``: coefficients of new activations, per latent location (NNLS with ``W`` fixed);
* ``importance``: total Sobol indices of the concept coefficients for a class
  (:mod:`explain.concepts.importance`);
* ``concept_maps``: where each concept is in an image, by implicit differentiation of the NNLS solution
  (:mod:`explain.concepts.implicit`) or from the thresholded coefficients (the reference code);
* ``decompose``: the recursive step: a concept of this layer split into sub-concepts at an earlier layer,
  fitted on the crops where it is most present;
* ``gallery``: a figure of each concept's top crops, ordered by importance.
"""

from __future__ import annotations

import contextlib
import copy
import math
import operator
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explain.base import eval_mode, model_device
from explain.batching import AutoBatchSize, BatchSize, resolve_batch_size, run_batched
from explain.concepts.crops import default_patch_size, default_stride, extract_crops
from explain.concepts.dictionary import Dictionary, NMFDictionary, make_dictionary
from explain.concepts.gallery import concept_gallery
from explain.concepts.implicit import jacobian_concept_maps
from explain.concepts.importance import concept_importance
from explain.concepts.nmf import NMF
from explain.concepts.nnls import nnls
from explain.sensitivity import Estimator
from explain.validation import in_interval, non_negative_int, positive_int

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_NEGATIVE_HELP = (
    "CRAFT factorizes nonnegative activations (NMF). Split the model after a ReLU, or, for networks with "
    "signed activations (GroupSort2 / MaxMin 1-Lipschitz networks), use "
    "explain.concepts.split_model(model, sign_split=True), which feeds cat(relu(z), relu(-z)) to CRAFT and "
    "recombines z exactly in latent_to_logit"
)


@contextlib.contextmanager
def _evaluating(part: Callable) -> Iterator[None]:
    """No graph, and eval mode (restored afterwards) when the part is an ``nn.Module``."""
    with torch.no_grad(), (eval_mode(part) if isinstance(part, nn.Module) else contextlib.nullcontext()):
        yield


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a floating point tensor [B, C, H, W], got {shape}")


class Craft:
    """``Craft(input_to_latent, latent_to_logit, n_concepts=10)``: CRAFT concepts of a model (module docstring).

    Args:
        input_to_latent: g, images [B, C, H, W] -> activations >= 0, [B, c, h, w] or [B, c]
            (see :func:`explain.concepts.split_model`).
        latent_to_logit: h, activations -> logits [B, classes]; only ``importance`` needs it.
        n_concepts: r, the NMF rank.
        patch_size: crop side in pixels; default ``round(min(H, W) * 64 / 224)`` (the reference's 64 at 224).
        stride: crop stride; default ``int(0.8 * patch_size)`` (the reference's).
        batch_size: inputs sent through ``input_to_latent`` / ``latent_to_logit`` at once, or ``"auto"``: the
            largest that fits (:mod:`explain.batching`), found and remembered per part and input shape in
            ``auto_batch_size`` (an :class:`~explain.batching.AutoBatchSize` that may be shared between the Crafts
            of one model: :class:`~explain.callbacks.ConceptMonitor` does). The results do not depend on it.
        nmf: options of :class:`~explain.concepts.nmf.NMF` (a mapping, or an ``NMF`` whose rank is
            ``n_concepts``); default ``init="nndsvda", max_iter=200`` as the reference's scikit-learn NMF.
        device: where the model parts and NMF run; default the device of ``input_to_latent`` when it is a
            module, else that of the images.
        dictionary: how concepts are extracted: a name of :func:`~explain.concepts.make_dictionary` (``"nmf"``,
            the default, ``"semi_nmf"``, ``"archetypal"``, ``"topk_sae"``, ``"batchtopk_sae"``,
            ``"jumprelu_sae"``, ``"archetypal_sae"``) or a :class:`~explain.concepts.Dictionary` with
            ``n_concepts`` atoms. Methods other than NMF take signed activations (no ``sign_split``).
        dictionary_options: options of the named dictionary (for ``"nmf"`` they update ``nmf``).

    Fitted attributes (None until set; scikit-learn's trailing underscore): after ``fit``, ``W_`` [r, c] (concept
    bank, on ``device``), ``crops_`` [n, C, p, p] (on CPU), ``crops_u_`` [n, r] (their coefficients),
    ``crops_image_`` [n] (index of each crop's image), ``image_size_``, ``patch_size_``, ``stride_``,
    ``class_id_``, ``crop_activations_`` [n, c] (the crops' spatially averaged activations that were
    factorized), ``dictionary_`` (the fitted :class:`~explain.concepts.Dictionary`) and ``factorizer_`` (the
    fitted :class:`~explain.concepts.nmf.NMF` for ``"nmf"``, else ``dictionary_``); after ``importance``,
    ``importances_`` [r]; on a child of :meth:`decompose`, ``parent_``, ``parent_concept_``, ``parent_crops_``,
    ``parent_weights_`` and ``parent_error_``. The names without the underscore (``W``, ``crops_u``, ...) are
    read-only aliases kept for earlier code.

    Raises:
        TypeError: ``input_to_latent`` (or a given ``latent_to_logit``) is not callable.
        ValueError: ``n_concepts`` not a positive int, ``batch_size`` neither that nor ``"auto"``,
            ``patch_size``/``stride`` neither None nor positive ints, an ``NMF`` whose rank is not ``n_concepts``, or a
            bad NMF option.

    >>> import torch
    >>> from torch import nn
    >>> g = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())   # images -> activations >= 0
    >>> h = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    >>> craft = Craft(g, h, n_concepts=2, patch_size=4, stride=2).fit(torch.rand(3, 3, 8, 8), class_id=0)
    >>> craft.W_.shape, craft.crops_u_.shape
    (torch.Size([2, 4]), torch.Size([27, 2]))
    >>> craft.importance(torch.rand(2, 3, 8, 8), nb_design=4).shape
    torch.Size([2])
    """

    def __init__(
        self,
        input_to_latent: Callable[[Tensor], Tensor],
        latent_to_logit: Callable[[Tensor], Tensor] | None = None,
        n_concepts: int = 10,
        patch_size: int | None = None,
        stride: int | None = None,
        batch_size: BatchSize = 64,
        nmf: Mapping[str, Any] | NMF | None = None,
        device: torch.device | str | None = None,
        dictionary: str | Dictionary = "nmf",
        dictionary_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not callable(input_to_latent):
            raise TypeError(f"input_to_latent must be callable (a module or a function), got {input_to_latent!r}")
        if latent_to_logit is not None and not callable(latent_to_logit):
            raise TypeError(f"latent_to_logit must be callable or None, got {latent_to_logit!r}")
        positive_int("n_concepts", n_concepts)
        resolved = resolve_batch_size("batch_size", batch_size, "Craft")
        #: with ``batch_size="auto"``, what finds and remembers the sizes that fit (None otherwise)
        self.auto_batch_size: AutoBatchSize | None = resolved if isinstance(resolved, AutoBatchSize) else None
        positive_int("patch_size", patch_size, allow_none=True)
        positive_int("stride", stride, allow_none=True)
        if isinstance(nmf, NMF):
            if nmf.rank != n_concepts:
                raise ValueError(f"nmf has rank {nmf.rank} but n_concepts={n_concepts}: make them equal")
            nmf = {"init": nmf.init, "max_iter": nmf.max_iter, "tol": nmf.tol, "inner_iter": nmf.inner_iter,
                   "warmup": nmf.warmup, "seed": nmf.seed}
        self.nmf_options = dict(nmf or {})
        NMF(n_concepts, **self.nmf_options)  # fail now on a bad option
        if isinstance(dictionary, Dictionary):
            if dictionary.n_concepts != n_concepts:
                raise ValueError(
                    f"dictionary has {dictionary.n_concepts} atoms but n_concepts={n_concepts}: make them equal"
                )
            if dictionary_options:
                raise ValueError("dictionary_options go with a dictionary name; a Dictionary carries its own options")
        elif not isinstance(dictionary, str):
            raise TypeError(f"dictionary must be a name or an explain.concepts.Dictionary, got {dictionary!r}")
        self.dictionary, self.dictionary_options = dictionary, dict(dictionary_options or {})
        self._new_dictionary(n_concepts)  # fail now on an unknown name or a bad option
        self.input_to_latent, self.latent_to_logit = input_to_latent, latent_to_logit
        self.n_concepts, self.patch_size, self.stride, self.batch_size = n_concepts, patch_size, stride, batch_size
        self.device = torch.device(device) if device is not None else None
        # fitted by fit()
        self.W_: Tensor | None = None
        self.crops_: Tensor | None = None
        self.crops_u_: Tensor | None = None
        self.crops_image_: Tensor | None = None
        self.image_size_: tuple[int, int] | None = None
        self.patch_size_: int | None = None
        self.stride_: int | None = None
        self.class_id_: int | None = None
        self.factorizer_: NMF | Dictionary | None = None
        self.dictionary_: Dictionary | None = None
        self.crop_activations_: Tensor | None = None
        # fitted by importance()
        self.importances_: Tensor | None = None
        # set on the child of decompose()
        self.parent_: Craft | None = None
        self.parent_concept_: int | None = None
        self.parent_crops_: Tensor | None = None
        self.parent_weights_: Tensor | None = None
        self.parent_error_: float | None = None

    def _new_dictionary(self, n_concepts: int) -> Dictionary:
        """An unfitted dictionary of ``n_concepts`` atoms as asked at construction (the given one, when it fits)."""
        if isinstance(self.dictionary, Dictionary):
            if n_concepts == self.dictionary.n_concepts:
                return self.dictionary
            params = {k: v for k, v in self.dictionary.get_params().items() if k != "n_concepts"}
            return type(self.dictionary)(n_concepts, **params)
        options = dict(self.dictionary_options)
        if self.dictionary == "nmf":
            options = {**self.nmf_options, **options}
        return make_dictionary(self.dictionary, n_concepts, **options)

    @property
    def _nonnegative(self) -> bool:
        kind = type(self.dictionary) if isinstance(self.dictionary, Dictionary) else None
        return kind.nonnegative_inputs if kind is not None else self.dictionary == "nmf"

    # ------------------------------------------------------------------ model evaluation
    def _device(self, like: Tensor) -> torch.device:
        if self.device is not None:
            return self.device
        if isinstance(self.input_to_latent, nn.Module):
            return model_device(self.input_to_latent, default=like.device)
        return like.device

    @property
    def _batch(self) -> int | AutoBatchSize:
        return self.auto_batch_size if self.auto_batch_size is not None else self.batch_size

    def _latents(self, inputs: Tensor, size: tuple[int, int] | None = None, pool: bool = False) -> Tensor:
        """``input_to_latent`` of ``inputs`` (resized to ``size``), ``batch_size`` at a time, checked >= 0."""
        device = self._device(inputs)
        key = ("input_to_latent", *inputs.shape[1:-2], *(size or inputs.shape[-2:]), inputs.dtype, device)
        run = lambda batch: self._latents_by(batch, inputs, size, pool)  # noqa: E731
        return run_batched(self._batch, key, device, run, inputs.shape[0])

    def _latents_by(self, batch_size: int, inputs: Tensor, size: tuple[int, int] | None, pool: bool) -> Tensor:
        device, outputs = self._device(inputs), []
        with _evaluating(self.input_to_latent):
            for chunk in inputs.split(batch_size):
                chunk = chunk.to(device)
                if size is not None and tuple(chunk.shape[-2:]) != tuple(size):
                    chunk = F.interpolate(chunk, size=size, mode="bilinear", align_corners=False)
                latent = self.input_to_latent(chunk)
                if latent.dtype in (torch.float16, torch.bfloat16):
                    latent = latent.float()  # the factorization and the solves need float32 at least
                if latent.ndim not in (2, 4):
                    raise ValueError(
                        f"input_to_latent must return activations [B, c, h, w] or [B, c], got {tuple(latent.shape)}"
                    )
                if self._nonnegative and float(latent.min()) < 0:
                    raise ValueError(
                        f"input_to_latent returned negative activations (min {float(latent.min()):.4g}). "
                        + _NEGATIVE_HELP
                    )
                outputs.append(latent.mean(dim=(2, 3)) if pool and latent.ndim == 4 else latent)
        return torch.cat(outputs)

    def _check_fitted(self) -> Tensor:
        if self.W_ is None:
            raise RuntimeError("this Craft is not fitted yet: call craft.fit(images) first")
        if self.dictionary_ is None or self.dictionary_.dictionary_ is not self.W_:
            # a concept bank set by hand: its codes are the NNLS ones, as before dictionaries existed
            self.dictionary_ = NMFDictionary(self.W_.shape[0])
            self.dictionary_.dictionary_ = self.W_
        return self.W_

    # ------------------------------------------------------------------ concepts
    def fit(self, images: Tensor, class_id: int | None = None) -> Craft:
        """Fit the concept bank on the crops of ``images`` [B, C, H, W] (inputs of the model, preprocessed).

        ``class_id``: the class these images stand for, kept as the default of :meth:`importance`.
        """
        _check_images(images)
        patch = self.patch_size or default_patch_size(tuple(images.shape[-2:]))
        stride = self.stride or default_stride(patch)
        crops = extract_crops(images, patch, stride)
        per_image = crops.shape[0] // images.shape[0]
        self.crops_image_ = torch.arange(images.shape[0]).repeat_interleave(per_image)
        self.patch_size_, self.stride_ = patch, stride
        return self._fit_crops(crops, tuple(images.shape[-2:]), class_id)

    def _fit_crops(self, crops: Tensor, image_size: tuple[int, int], class_id: int | None) -> Craft:
        if crops.shape[0] < self.n_concepts:
            raise ValueError(
                f"{crops.shape[0]} crops are too few for {self.n_concepts} concepts: give more images (or larger "
                "ones), a smaller patch_size/stride, or fewer concepts"
            )
        activations = self._latents(crops, size=image_size, pool=True)
        self.dictionary_ = self._new_dictionary(self.n_concepts)
        self.crops_u_ = self.dictionary_.fit_transform(activations)
        self.crop_activations_ = activations
        self.W_ = self.dictionary_.dictionary_
        self.factorizer_ = getattr(self.dictionary_, "factorizer_", self.dictionary_)
        self.crops_ = crops.detach().cpu()
        self.image_size_, self.class_id_ = tuple(image_size), class_id
        return self

    def transform(self, images: Tensor) -> Tensor:
        """Concept coefficients of ``images``: [B, h, w, r] per latent location ([B, r] for a flat latent).

        The dictionary's ``encode`` at every location, ``W`` fixed: for NMF the NNLS ``argmin_{U >= 0} ||A - U W||``
        (the reference's ``transform``).
        """
        _check_images(images)
        return self._coefficients(self._latents(images)).to(images.device)

    def _coefficients(self, activations: Tensor) -> Tensor:
        self._check_fitted()
        if activations.ndim == 2:
            return self.dictionary_.encode(activations)
        batch, channels, height, width = activations.shape
        flat = activations.permute(0, 2, 3, 1).reshape(-1, channels)
        return self.dictionary_.encode(flat).reshape(batch, height, width, -1)

    # ------------------------------------------------------------------ importance
    def importance(
        self,
        images: Tensor,
        class_id: int | Tensor | None = None,
        nb_design: int = 32,
        *,
        sampler: Literal["sobol", "halton"] = "halton",
        estimator: Estimator = "jansen",
        seed: int | None = 0,
        per_image: bool = False,
    ) -> Tensor:
        """Importance [r] of each concept for ``class_id``: total Sobol indices averaged over ``images``.

        ``nb_design * (r + 1)`` masked passes through ``latent_to_logit`` per image (see
        :mod:`explain.concepts.importance`); ``per_image=True`` returns the indices of each image [B, r].
        ``class_id`` defaults to the one given to ``fit``. The mean is kept as ``importances`` (for ``gallery``).

        Raises:
            ValueError: no ``latent_to_logit``, or no ``class_id`` (here or at ``fit``).
        """
        w = self._check_fitted()
        if self.latent_to_logit is None:
            raise ValueError("importance needs latent_to_logit: pass it to Craft(input_to_latent, latent_to_logit)")
        class_id = self.class_id_ if class_id is None else class_id
        if class_id is None:
            raise ValueError("importance needs a class_id (none was given here or to fit)")
        _check_images(images)
        u = self._coefficients(self._latents(images))
        with _evaluating(self.latent_to_logit):
            indices = concept_importance(
                u, w, self.latent_to_logit, class_id, nb_design=nb_design, sampler=sampler, estimator=estimator,
                seed=seed, batch_size=self._batch,
            ).to(images.device)
        self.importances_ = indices.mean(dim=0)
        return indices if per_image else self.importances_

    # ------------------------------------------------------------------ attribution maps
    def concept_maps(
        self,
        images: Tensor,
        method: Literal["implicit", "activation"] = "implicit",
        percentile: float | None = 90.0,
    ) -> Tensor:
        """Where each concept is in each image: [B, r, H, W] (needs spatial activations).

        * ``"implicit"``: ``ReLU(A . J_k) / (h w)`` at every latent location, with ``J = du/d(mean_hw A)`` the
          derivative of the image's codes (the dictionary's ``code_jacobian``: for NMF and semi-NMF the implicit
          derivative of the NNLS coefficients, :mod:`explain.concepts.implicit`; for an SAE the encoder's own
          gradient), resized bicubic (as the reference's Grad-CAM) and clipped at 0. Archetypal analysis has no
          derivative: it raises ``NotImplementedError`` (use ``"activation"``).
        * ``"activation"``: the coefficients ``U`` [B, h, w, r] of :meth:`transform`, set to 0 where at most
          the ``percentile``-th percentile of that concept over all the given images and locations (the
          reference notebook's display; None keeps all), resized bilinear.

        Raises:
            ValueError: ``input_to_latent`` gives no spatial activations [B, c, h, w], or an unknown ``method``.
        """
        w = self._check_fitted()
        _check_images(images)
        activations = self._latents(images)
        if activations.ndim != 4:
            raise ValueError(
                "concept maps need spatial activations [B, c, h, w]; input_to_latent returns "
                f"{tuple(activations.shape)}"
            )
        size = tuple(images.shape[-2:])
        if method == "implicit":
            maps = jacobian_concept_maps(activations, self.dictionary_.code_jacobian(activations.mean(dim=(2, 3))))
            maps = F.interpolate(maps, size=size, mode="bicubic", align_corners=False).clamp_min(0)
        elif method == "activation":
            maps = self._coefficients(activations).permute(0, 3, 1, 2)
            if percentile is not None:
                in_interval("percentile", percentile, 0, 100)
                # the percentile per concept over every location of every image, linear interpolation as
                # torch.quantile (which refuses more than 2^24 values: sort instead)
                values = maps.transpose(0, 1).flatten(1).float().sort(dim=1).values
                position = percentile / 100 * (values.shape[1] - 1)
                low, high = values[:, math.floor(position)], values[:, math.ceil(position)]
                sigma = (low + (high - low) * (position - math.floor(position))).to(maps.dtype)
                maps = maps * (maps > sigma[None, :, None, None])
            maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        else:
            raise ValueError(f"method must be 'implicit' or 'activation', got {method!r}")
        return maps.to(images.device)

    # ------------------------------------------------------------------ recursion
    def decompose(
        self,
        concept: int,
        input_to_latent: Callable[[Tensor], Tensor],
        latent_to_logit: Callable[[Tensor], Tensor] | None = None,
        n_concepts: int | None = None,
        top_fraction: float = 0.2,
    ) -> Craft:
        """Split ``concept`` into sub-concepts at an earlier layer (CRAFT's recursion).

        A new ``Craft`` on ``input_to_latent`` (the earlier layer; ``latent_to_logit`` from there to the
        logits, optional) is fitted on the crops of this one where ``concept`` is most present: the
        ``top_fraction`` of crops with the largest coefficient (among those where it is > 0), no new cropping.
        It knows its parent: ``parent``, ``parent_concept``, ``parent_crops`` (indices into ``parent.crops``)
        and ``parent_weights`` [r'] = ``argmin_{b >= 0} ||u - U' b||``, the nonnegative combination of the
        sub-concepts' coefficients ``U'`` that best reconstructs the parent's coefficient ``u`` on those crops,
        hence the parent concept's activations ``u W[concept] ~= (U' b) W[concept]``, with relative error
        ``parent_error = ||u - U' b|| / ||u||``.

        Raises:
            ValueError: ``concept`` not in ``[0, n_concepts)``, or too few crops of it for ``n_concepts``
                sub-concepts.
        """
        self._check_fitted()
        if non_negative_int("concept", concept) >= self.n_concepts:
            raise ValueError(f"concept must be an int in [0, {self.n_concepts}), got {concept!r}")
        in_interval("top_fraction", top_fraction, 0, 1, low_open=True)
        n_concepts = n_concepts or self.n_concepts
        scores = self.crops_u_[:, concept]
        present = int((scores > 0).sum())
        count = min(present, math.ceil(top_fraction * scores.shape[0]))
        if count < n_concepts:
            raise ValueError(
                f"concept {concept} is present in {present} crops, {count} of them in the top {top_fraction:.0%}: "
                f"too few for {n_concepts} sub-concepts; raise top_fraction, ask for fewer sub-concepts, or fit on "
                "more images"
            )
        selected = scores.topk(count).indices.cpu()
        dictionary = self._new_dictionary(n_concepts)
        child = Craft(
            input_to_latent, latent_to_logit, n_concepts, patch_size=self.patch_size, stride=self.stride,
            batch_size=self.batch_size, nmf=self.nmf_options, device=self.device,
            dictionary=dictionary if dictionary is not self.dictionary else copy.deepcopy(dictionary),
        )
        child.patch_size_, child.stride_ = self.patch_size_, self.stride_
        child.crops_image_ = self.crops_image_[selected] if self.crops_image_ is not None else None
        child._fit_crops(self.crops_[selected], self.image_size_, self.class_id_)
        parent_u = scores[selected.to(scores.device)]
        sub_u = child.crops_u_.to(parent_u)
        weights = nnls(parent_u[None, :], sub_u.T)[0]
        child.parent_, child.parent_concept_, child.parent_crops_ = self, concept, selected
        child.parent_weights_ = weights
        child.parent_error_ = float((parent_u - sub_u @ weights).norm() / parent_u.norm().clamp_min(1e-30))
        return child

    # ------------------------------------------------------------------ figure
    def gallery(
        self,
        images: Tensor | None = None,
        top_k: int = 10,
        importance: Tensor | None = None,
        concepts: list[int] | None = None,
    ) -> Figure:
        """Figure of each concept's ``top_k`` crops, rows by decreasing importance.

        Crops of ``images`` when given (cut as in ``fit``), else the fitted crops. ``importance`` defaults to
        the last result of :meth:`importance` (concept order when there is none).
        """
        self._check_fitted()
        if images is None:
            crops, u = self.crops_, self.crops_u_
        else:
            _check_images(images)
            crops = extract_crops(images, self.patch_size_, self.stride_)
            u = self._coefficients(self._latents(crops, size=tuple(images.shape[-2:]), pool=True))
        importance = self.importances_ if importance is None else torch.as_tensor(importance)
        return concept_gallery(crops.cpu(), u.cpu(), None if importance is None else importance.cpu(), top_k, concepts)

    def __repr__(self) -> str:
        state = "fitted" if self.W_ is not None else "not fitted"
        return f"Craft(n_concepts={self.n_concepts}, patch_size={self.patch_size}, {state})"


#: fitted attributes of :class:`Craft` that earlier code reads without the trailing underscore
_ALIASED = ("W", "crops", "crops_u", "crops_image", "image_size", "class_id", "factorizer", "importances", "parent",
            "parent_concept", "parent_crops", "parent_weights", "parent_error")
for _name in _ALIASED:  # read-only: fitting writes the underscored attribute
    setattr(Craft, _name, property(operator.attrgetter(f"{_name}_"), doc=f"Read-only alias of ``{_name}_``."))
