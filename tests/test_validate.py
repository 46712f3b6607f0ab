import torch

from mmft.training.validate import paired_gain, recall_and_hits, recall_from_embeddings


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
