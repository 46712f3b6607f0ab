"""Retrieval metrics: FAISS path vs full-matrix reference, hand-made multi-caption cases, bootstrap CIs."""
from __future__ import annotations

import numpy as np
import pytest

from mmft.evaluation import metrics as M
from mmft.evaluation.core import direction_results


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _random_set(n_img=53, d=29, seed=0):
    """Images, captions (0-4 per image, some images without any) and groups, continuous random vectors."""
    rng = np.random.default_rng(seed)
    per = rng.integers(0, 5, n_img)
    caption_image = np.repeat(np.arange(n_img), per)
    image = _unit(rng.standard_normal((n_img, d)))
    text = _unit(image[caption_image] * 0.6 + rng.standard_normal((len(caption_image), d)))  # related, noisy
    groups = [f"g{i}" for i in rng.integers(0, 6, n_img)]
    return image, text, caption_image, groups


@pytest.mark.parametrize("relevance", ["instance", "group"])
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_faiss_metrics_equal_full_matrix_reference(relevance, direction):
    image, text, ci, groups = _random_set()
    labels = M.relevance_labels(ci, len(image), groups, relevance)[direction]
    q, g = (text, image) if direction == "t2i" else (image, text)
    ks = [1, 5, 10]
    got = direction_results(q, g, *labels, ks)
    keep = M.relevant_counts(*labels) > 0
    ref = M.reference_metrics(q[keep], g, labels[0][keep], labels[1], ks)
    if direction == "i2t" and relevance == "instance":
        assert keep.sum() < len(image)  # images without captions are left out as queries
    for k in ks:
        np.testing.assert_array_equal(got["hits"][k], ref["hits"][k])
    np.testing.assert_allclose(got["ap10"], ref["ap10"], rtol=1e-12)
    np.testing.assert_array_equal(got["rank"], ref["rank"])
    np.testing.assert_array_equal(ref["rank"], ref["first_sorted"] + 1)  # rank = first relevant position
    assert (got["rank"] > 10).any()  # some ranks came from the counting pass, not the top k


def test_exact_ranks_with_ragged_blocks_match_reference():
    image, text, ci, _ = _random_set(n_img=101, d=17, seed=3)
    q_l, g_l = M.relevance_labels(ci, len(image))["t2i"]
    ranks = M.exact_first_ranks(text, image, q_l, g_l, q_block=7, g_block=11)
    ref = M.reference_metrics(text, image, q_l, g_l, [1])["rank"]
    np.testing.assert_array_equal(ranks, ref)
    best = M.best_relevant_scores(text, image, q_l, g_l, pair_block=5)
    np.testing.assert_allclose(best, np.einsum("qd,qd->q", text, image[ci]), rtol=1e-6)


def _hand_made():
    """3 images (axes e1, e2, e3 of R^4) and 5 captions whose neighbours are known by hand."""
    e = np.eye(4, dtype=np.float32)
    image = e[:3]
    text = _unit(np.stack([
        e[0] + 0.1 * e[3],  # c0 of img0: nearest img0 (rank 1)
        e[1] + 0.5 * e[0],  # c1 of img0: nearest img1, then img0 (rank 2)
        e[1] + 0.2 * e[2],  # c2 of img1: nearest img1 (rank 1)
        e[0] + 0.3 * e[2],  # c3 of img2: nearest img0, then img2 (rank 2)
        e[2] + 0.05 * e[3],  # c4 of img2: nearest img2 (rank 1)
    ]))
    return image, text, np.array([0, 0, 1, 2, 2])


def test_hand_made_multi_caption_case():
    image, text, ci = _hand_made()
    lab = M.relevance_labels(ci, 3)
    t2i = direction_results(text, image, *lab["t2i"], [1, 5, 10])
    assert t2i["hits"][1].tolist() == [True, False, True, False, True]  # R@1 = 3/5
    assert t2i["rank"].tolist() == [1, 2, 1, 2, 1]
    assert t2i["hits"][5].all()
    np.testing.assert_allclose(t2i["ap10"], [1, 0.5, 1, 0.5, 1])
    i2t = direction_results(image, text, *lab["i2t"], [1, 5, 10])
    # img0 ranks c0 (its own), c3, c1 (its own): hit at 1, AP = (1/1 + 2/3) / 2
    assert i2t["hits"][1].tolist() == [True, True, True]
    np.testing.assert_allclose(i2t["ap10"][0], (1 + 2 / 3) / 2)
    # class-level: img0 and img1 share group "a", so c1 (of img0) hits at 1 through img1
    lab_g = M.relevance_labels(ci, 3, ["a", "a", "b"], "group")
    t2i_g = direction_results(text, image, *lab_g["t2i"], [1, 5, 10])
    assert t2i_g["hits"][1].tolist() == [True, True, True, False, True]
    assert t2i_g["rank"].tolist() == [1, 1, 1, 2, 1]


def test_group_relevance_needs_groups():
    with pytest.raises(ValueError, match="group id for every image"):
        M.relevance_labels(np.array([0]), 1, None, "group")


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_estimate_and_shrinks_with_more_queries():
    rng = np.random.default_rng(0)
    widths = []
    for q in (100, 400, 1600):
        hits = (rng.random(q) < 0.3).astype(float)
        lo, hi = M.bootstrap_ci(hits, n=1000, seed=1)
        assert lo <= hits.mean() <= hi
        widths.append(hi - lo)
    # width ~ 1/sqrt(Q): halves for each 4x more queries
    assert widths[1] < 0.65 * widths[0] and widths[2] < 0.65 * widths[1]


def test_bootstrap_is_seeded_and_chunking_does_not_change_it():
    v = np.random.default_rng(0).random((3, 257))
    a = M.bootstrap_means(v, n=300, seed=7)
    np.testing.assert_array_equal(a, M.bootstrap_means(v, n=300, seed=7))
    assert not np.array_equal(a, M.bootstrap_means(v, n=300, seed=8))
    np.testing.assert_array_equal(a, M.bootstrap_means(v, n=300, seed=7, max_elems=1000))  # other chunks


def test_bootstrap_ci_covers_the_true_mean_about_95_percent():
    rng = np.random.default_rng(1)
    cover = 0
    for s in range(200):
        x = (rng.random(150) < 0.4).astype(float)
        lo, hi = M.bootstrap_ci(x, n=400, seed=s)
        cover += lo <= 0.4 <= hi
    assert 0.88 <= cover / 200 <= 0.99


def test_paired_delta_ci_is_narrower_than_unpaired_for_correlated_rows():
    rng = np.random.default_rng(2)
    a = (rng.random(300) < 0.5).astype(float)
    b = a.copy()
    flip = rng.random(300) < 0.1
    b[flip] = 1 - b[flip]
    delta, lo, hi = M.paired_delta_ci(a, b, n=1000, seed=0)
    assert delta == pytest.approx(b.mean() - a.mean()) and lo <= delta <= hi
    # unpaired: independent resamples of the two rows
    ulo, uhi = M.percentile_ci(M.bootstrap_means(b, 1000, 1)[:, 0] - M.bootstrap_means(a, 1000, 0)[:, 0])
    assert hi - lo < 0.6 * (uhi - ulo)
    assert M.paired_delta_ci(a, a, 200, 0) == (0.0, 0.0, 0.0)
