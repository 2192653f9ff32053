"""CUBE: cluster the training rows in the victim's representation space, keep each label's main cluster.

Paper: Ganqu Cui, Lifan Yuan, Bingxiang He, Yangyi Chen, Zhiyuan Liu, Maosong Sun, "A Unified
Evaluation of Textual Backdoor Learning: Frameworks and Benchmarks", NeurIPS 2022 Datasets and
Benchmarks (arXiv:2206.08514). Reference code: OpenBackdoor's ``CUBEDefender`` with
``Trainer.compute_hidden`` / ``Trainer.dimension_reduction``.

Training-data filtering. Poisoned rows, relabelled to the target, form their own cluster in a
backdoored model's representation space, away from the target label's clean rows:

1. Embed every training row with the model trained on the poisoned data: the pooler output of the
   last layer's first token (BERT; the first-token state where the model has no pooler).
2. Reduce: PCA to 20 dimensions, then UMAP (``umap-learn``) to 2 with 100 neighbours and
   ``min_dist`` 0.
3. Cluster with HDBSCAN (scikit-learn's ``HDBSCAN``; ``min_samples`` 100, ``cluster_selection_epsilon``
   0, ``min_cluster_size`` 5). Noise (-1) counts as one more cluster, as in the reference.
4. For every label, keep the largest cluster among that label's rows; drop the label's rows in any
   other cluster holding fewer than half of them. Train the usual victim on the rest.

Per-row score for the evaluator's AUROC: ``1 − (rows of the label in the row's cluster) / (rows of
the label)``, so rows of small clusters score high. The poison mask is never seen here.

Deviations from the reference code, all deliberate:

- The encoder is the cell's victim (the shared recipe on the poisoned data; the paper and the issue:
  "embed the training rows with the victim"); OpenBackdoor trains a separate ``roberta-base`` for 10
  epochs on the poisoned data.
- HDBSCAN is scikit-learn's implementation rather than the ``hdbscan`` package (same algorithm and
  parameters; its defaults match: ``min_cluster_size`` 5, euclidean).
- PCA and UMAP are seeded from the cell seed (stream ``cube``); the reference fixes 42. PCA
  components are capped at the number of rows and the hidden size, and UMAP neighbours below the
  number of rows, so tiny test sets run.
- Texts are truncated to the victim's ``max_length`` and embedded in length-sorted batches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedModel

from nlpbd.config import option
from nlpbd.methods import DefenseContext, FilterDefense, FilterResult, register_defense
from nlpbd.representations import sentence_states
from nlpbd.seeding import seed_for

log = logging.getLogger(__name__)


@dataclass
class CUBEConfig:
    pca_components: int = option(20, "PCA dimensions before UMAP (reference: 20)", low=1)
    n_neighbors: int = option(100, "UMAP neighbours (reference: 100)", low=2)
    min_dist: float = option(0.0, "UMAP min_dist (reference: 0 in CUBE's call)", low=0.0)
    umap_components: int = option(2, "UMAP output dimensions (reference: 2)", low=1)
    min_samples: int = option(100, "HDBSCAN min_samples (reference: 100)", low=1)
    min_cluster_size: int = option(5, "HDBSCAN min_cluster_size (reference: the hdbscan default 5)", low=2)
    cluster_selection_epsilon: float = option(0.0, "HDBSCAN cluster_selection_epsilon (reference: 0)", low=0.0)
    drop_scale: float = option(0.5, "a label's minor cluster is dropped when it holds fewer than this fraction "
                               "of the label's rows (reference: 0.5)", low=0.0, high=1.0)
    batch_size: int = option(64, "texts per forward batch", low=1)


def reduce(states: np.ndarray, config: CUBEConfig, seed: int) -> np.ndarray:
    """PCA, then UMAP, both seeded from the cell seed."""
    from sklearn.decomposition import PCA
    from umap import UMAP

    random_state = seed_for(seed, "cube") % (2**31)
    components = min(config.pca_components, states.shape[0], states.shape[1])
    reduced = PCA(n_components=components, random_state=random_state).fit_transform(states)
    umap = UMAP(n_neighbors=min(config.n_neighbors, states.shape[0] - 1), min_dist=config.min_dist,
                n_components=config.umap_components, random_state=random_state, transform_seed=random_state)
    return umap.fit(reduced).embedding_


def cluster(embedding: np.ndarray, config: CUBEConfig) -> np.ndarray:
    from sklearn.cluster import HDBSCAN

    hdbscan = HDBSCAN(min_cluster_size=config.min_cluster_size, min_samples=min(config.min_samples, len(embedding)),
                      cluster_selection_epsilon=config.cluster_selection_epsilon, copy=True)
    return hdbscan.fit_predict(embedding)


def filter_clusters(labels: np.ndarray, clusters: np.ndarray, drop_scale: float) -> tuple[list[int], np.ndarray, dict]:
    """Per label: keep the largest cluster; drop the other clusters holding < drop_scale of the label's rows.

    Returns the kept positions, a per-row score (1 − the row's cluster share within its label) and the
    cluster sizes per label.
    """
    dropped = np.zeros(len(labels), dtype=bool)
    scores = np.zeros(len(labels), dtype=float)
    sizes: dict[str, dict[str, int]] = {}
    for label in sorted(set(labels.tolist())):
        rows = np.flatnonzero(labels == label)
        ids, counts = np.unique(clusters[rows], return_counts=True)
        sizes[str(label)] = {str(c): int(n) for c, n in zip(ids, counts)}
        largest = ids[np.argmax(counts)]
        for cluster_id, count in zip(ids, counts):
            members = rows[clusters[rows] == cluster_id]
            scores[members] = 1.0 - count / len(rows)
            if cluster_id != largest and count < drop_scale * len(rows):
                dropped[members] = True
    return np.flatnonzero(~dropped).tolist(), scores, sizes


@register_defense
class CUBE(FilterDefense):
    name = "cube"
    description = "cluster the training rows (victim states, UMAP, HDBSCAN), keep each label's main cluster, retrain"
    Config = CUBEConfig
    grants = frozenset({"train_set"})  # the training texts and their (possibly flipped) labels

    def filter(self, model: PreTrainedModel, ctx: DefenseContext) -> FilterResult:
        config, train = self.config, ctx.train_set
        states = sentence_states(model, ctx.tokenizer, list(train.texts), ctx.train_config.max_length,
                                 config.batch_size, ctx.device, pooled=True)
        clusters = cluster(reduce(states, config, ctx.seed), config)
        keep, scores, sizes = filter_clusters(np.asarray(train.labels), clusters, config.drop_scale)
        log.info("CUBE: %d clusters (noise included); %d of %d rows removed", len(set(clusters.tolist())),
                 len(train) - len(keep), len(train))
        return FilterResult(keep, scores, {"clusters": len(set(clusters.tolist())), "cluster_sizes": sizes,
                                           "removed_rows": len(train) - len(keep)})
