"""Pure metric functions (tensors in, floats or small tensors out), exactly as METRICS.md.

- ``entropy``: options and presets, matrix alpha-entropy, prompt and dataset entropy.
- ``spectral``: singular-value metrics of the pooled matrix ``Z`` (one pass: ``dataset_metrics``).
- ``geometry``: pooling, sparsity, curvature, and the base-vs-SFT pair metrics (CKA, cosine, ...).
- ``lowrank``: the one effective rank, numerical rank at a given precision, exact/randomized
  and LoRA singular values, low-rank metrics of weight changes.
- ``stats``: bootstrap / t / Wilson intervals, paired t-test, correlation across layers.
- ``paired``: ``paired_difference``, the one comparison of two conditions on the same items
  (a finding names a winner only when its interval excludes 0).

Batched ``*_batch`` functions take padded ``H [B, T, D]`` plus a real-token mask ``[B, T]``
and are what the streaming capture calls; padding never changes their results.
"""

from sftscope.metrics.entropy import (
    NORMALISATIONS,
    PRESETS,
    MetricOptions,
    TokenBatch,
    alpha_entropy,
    alpha_entropy_batch,
    dataset_entropies,
    dataset_entropy,
    get_options,
    gram_spectrum_batch,
    normalise_entropy,
    pad_samples,
    prompt_entropies_batch,
    prompt_entropy,
    prompt_entropy_batch,
)
from sftscope.metrics.geometry import (
    CKAAccumulator,
    PooledPair,
    SparsityGroups,
    cka,
    cosine_similarity,
    cosine_similarity_batch,
    curvature,
    curvature_batch,
    delta,
    l2_norm,
    l2_norm_spread,
    mean_shift,
    mean_shift_relative,
    pair_metrics,
    pool_batch,
    sparsity,
    sparsity_batch,
    token_metric_names,
    token_metrics_batch,
)
from sftscope.metrics.lowrank import (
    dense_svdvals,
    dtype_eps,
    effective_rank_of,
    lora_svdvals,
    numerical_rank,
    rank_tolerance,
    spectrum_metrics,
)
from sftscope.metrics.spectral import (
    PooledLayer,
    condition_number,
    dataset_metric_names,
    dataset_metrics,
    effective_rank,
    rank_deficiency,
    spectral_norm,
    spectrum,
)
from sftscope.metrics.stats import (
    bootstrap_ci,
    cluster_ratio_ci,
    cluster_stat_ci,
    correlation_matrix,
    correlation_pairs,
    mean_ci,
    paired_ttest,
    proportion_ci,
)

__all__ = [
    "dataset_metric_names",
    "PooledLayer",
    "pair_metrics",
    "PooledPair",
    "TokenBatch",
    "CKAAccumulator",
    "MetricOptions",
    "NORMALISATIONS",
    "PRESETS",
    "SparsityGroups",
    "alpha_entropy",
    "alpha_entropy_batch",
    "bootstrap_ci",
    "cka",
    "cluster_ratio_ci",
    "cluster_stat_ci",
    "condition_number",
    "correlation_matrix",
    "correlation_pairs",
    "cosine_similarity",
    "cosine_similarity_batch",
    "curvature",
    "curvature_batch",
    "dataset_entropies",
    "dataset_entropy",
    "dataset_metrics",
    "delta",
    "dense_svdvals",
    "dtype_eps",
    "effective_rank",
    "effective_rank_of",
    "get_options",
    "gram_spectrum_batch",
    "l2_norm",
    "l2_norm_spread",
    "lora_svdvals",
    "mean_ci",
    "mean_shift",
    "mean_shift_relative",
    "normalise_entropy",
    "numerical_rank",
    "pad_samples",
    "paired_ttest",
    "pool_batch",
    "prompt_entropies_batch",
    "prompt_entropy",
    "prompt_entropy_batch",
    "proportion_ci",
    "rank_deficiency",
    "rank_tolerance",
    "sparsity",
    "sparsity_batch",
    "spectral_norm",
    "spectrum",
    "spectrum_metrics",
    "token_metric_names",
    "token_metrics_batch",
]
