import numpy as np
import torch

from mmft.training.validate import paired_gain, recall_and_hits, recall_from_embeddings, selection_noise


def _brute(img, txt, owner, groups, k):
    """Loop reference: a query hits when a relevant item is among its top k (ties: relevant first)."""
    g_img = groups if groups is not None else torch.arange(img.shape[0])
    g_cap = g_img[owner]
    t2i = i2t = 0
    for j in range(txt.shape[0]):
        s = img @ txt[j]
        best = s[g_img == g_cap[j]].max()
        t2i += int((s > best).sum() < k)
    for i in range(img.shape[0]):
        s = txt @ img[i]
        best = s[g_cap == g_img[i]].max()
        i2t += int((s > best).sum() < k)
    return 100 * t2i / txt.shape[0], 100 * i2t / img.shape[0]


def test_matches_loop_reference_for_instance_and_group_relevance():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(23, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(41, 8), dim=-1)
    owner = torch.cat([torch.arange(23), torch.randint(0, 23, (18,))])
    groups = torch.randint(0, 5, (23,))
    for g in (None, groups):
        out = recall_from_embeddings(img, txt, owner, g, ks=(1, 5))
        for k in (1, 5):
            t2i, i2t = _brute(img, txt, owner, g, k)
            assert abs(out[f"t2i_r{k}"] - t2i) < 1e-4 and abs(out[f"i2t_r{k}"] - i2t) < 1e-4


def test_hand_made_case():
    img = torch.eye(3)
    # caption 1 belongs to image 1 but looks like image 2
    txt = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 0, 1]])
    owner = torch.tensor([0, 1, 2])
    out = recall_from_embeddings(img, txt, owner, ks=(1,))
    assert abs(out["t2i_r1"] - 100 * 2 / 3) < 1e-4
    out = recall_from_embeddings(img, txt, owner, torch.tensor([0, 1, 1]), ks=(1,))  # 1 and 2 same class
    assert out["t2i_r1"] == 100.0


def test_intervals_hold_the_metric_and_shrink_with_more_queries():
    """The 95% bootstrap interval contains the point value, is wider on 40 queries than on 640 drawn from
    the same noisy retrieval, and is about what the binomial spread of a mean of hits predicts."""
    widths = {}
    for n in (40, 640):
        g = torch.Generator().manual_seed(n)
        img = torch.nn.functional.normalize(torch.randn(n, 16, generator=g), dim=-1)
        txt = torch.nn.functional.normalize(img + 0.9 * torch.randn(n, 16, generator=g), dim=-1)
        out = recall_from_embeddings(img, txt, torch.arange(n), ks=(1, 5))
        assert out["queries"] == {"t2i": n, "i2t": n}
        for key in ("mean", "mean_r1", "mean_r5"):
            lo, hi = out[f"{key}_ci95"]
            assert lo <= out[key] <= hi
        widths[n] = out["mean_r1_ci95"][1] - out["mean_r1_ci95"][0]
        p = out["mean_r1"] / 100
        expect = 2 * 1.96 * 100 * (p * (1 - p) / (2 * n)) ** 0.5  # two directions of n queries each
        assert 0.6 * expect < widths[n] < 1.6 * expect, (n, widths[n], expect)
    assert widths[40] > 2.5 * widths[640]


def test_paired_gain_is_the_metric_difference_with_a_paired_interval():
    """Two steps scored on the same queries: the gain is the difference of their `mean`, its interval
    holds it, and because the draws pair the queries it is much narrower than the two steps' own
    intervals side by side; another split gives nothing to pair with."""
    g = torch.Generator().manual_seed(3)
    n = 120
    img = torch.nn.functional.normalize(torch.randn(n, 16, generator=g), dim=-1)
    noise = torch.randn(n, 16, generator=g)
    before, hits0 = recall_and_hits(img, torch.nn.functional.normalize(img + 1.2 * noise, dim=-1),
                                    torch.arange(n))
    after, hits1 = recall_and_hits(img, torch.nn.functional.normalize(img + 0.9 * noise, dim=-1),
                                   torch.arange(n))
    out = paired_gain(hits1, hits0)
    assert abs(out["gain"] - (after["mean"] - before["mean"])) < 1e-9
    lo, hi = out["gain_ci95"]
    assert lo <= out["gain"] <= hi
    unpaired = sum(m["mean_ci95"][1] - m["mean_ci95"][0] for m in (after, before))
    assert hi - lo < 0.7 * unpaired, (hi - lo, unpaired)
    assert lo > 0  # less noise on the same queries: a gain the paired draws can see
    same = paired_gain(hits0, hits0)
    assert same["gain"] == 0 and same["gain_ci95"] == [0.0, 0.0]
    fewer = {d: [row[:-1] for row in h] for d, h in hits0.items()}
    assert paired_gain(hits1, fewer) == {}


def _hits(rng, q: int, rates: dict) -> dict:
    """Hits of one validation: per direction (2, q) 0/1 rows for R@1 and R@5 at the given hit rates."""
    out = {}
    for d, (r1, r5) in rates.items():
        u = rng.random(q)
        out[d] = torch.from_numpy(np.stack([u < r1, u < r5]).astype(np.uint8))  # R@1 hits are R@5 hits
    return out


def test_selection_noise_is_sure_of_a_clear_winner_and_not_of_a_coin_flip():
    rng = np.random.default_rng(0)
    weak = {"t2i": (0.2, 0.5), "i2t": (0.2, 0.5)}
    strong = {"t2i": (0.5, 0.9), "i2t": (0.5, 0.9)}
    clear = [{"step": s, "hits": _hits(rng, 300, r)} for s, r in ((10, weak), (20, strong), (30, weak))]
    out = selection_noise(clear, "mean", chosen=20, n=400)
    assert out["chosen_share"] == 1.0 and out["contenders"] == {"20": 1.0}
    assert out["regret"] == 0.0 and out["validations"] == 3 and out["queries"] == {"t2i": 300, "i2t": 300}
    assert out["over_last"]["step"] == 30 and out["over_last"]["gain_ci95"][0] > 20
    # two steps with the same recall on 40 queries, hit by different queries: a coin flip (ties go
    # to the earlier step, as in the trainer)
    a = _hits(rng, 40, weak)
    shuffled = {d: h[:, rng.permutation(40)] for d, h in a.items()}
    flip = [{"step": 10, "hits": a}, {"step": 20, "hits": shuffled}]
    out = selection_noise(flip, "mean", chosen=10, n=400)
    assert 0.3 < out["chosen_share"] < 0.8 and set(out["contenders"]) == {"10", "20"}
    assert out["regret_p95"] > 2.0 and "over_last" in out


def test_selection_noise_follows_the_metric_and_refuses_what_it_cannot_score():
    rng = np.random.default_rng(1)
    t2i_good = {"t2i": (0.6, 0.9), "i2t": (0.1, 0.3)}
    i2t_good = {"t2i": (0.1, 0.3), "i2t": (0.6, 0.9)}
    hist = [{"step": 5, "hits": _hits(rng, 200, t2i_good)}, {"step": 10, "hits": _hits(rng, 200, i2t_good)}]
    assert selection_noise(hist, "t2i_r1", chosen=5)["contenders"] == {"5": 1.0}
    assert selection_noise(hist, "i2t_r5", chosen=10)["contenders"] == {"10": 1.0}
    assert selection_noise(hist, "i2t_r5", chosen=5)["chosen_share"] == 0.0
    assert "over_last" not in selection_noise(hist, "t2i_r1", chosen=5)  # the gain is of `mean` only
    assert selection_noise(hist, "loss", chosen=5) == {}  # not a function of the hits
    assert selection_noise(hist[:1], "mean", chosen=5) == {}  # one validation: nothing to choose
    assert selection_noise(hist, "mean", chosen=7) == {}  # a step that was never validated
    other_split = [hist[0], {"step": 10, "hits": _hits(rng, 150, i2t_good)}]
    assert selection_noise(other_split, "mean", chosen=5) == {}
