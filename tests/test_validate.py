import torch

from mmft.training.validate import recall_from_embeddings


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
    txt = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 0, 1]])  # caption 1 belongs to image 1 but looks like image 2
    owner = torch.tensor([0, 1, 2])
    out = recall_from_embeddings(img, txt, owner, ks=(1,))
    assert abs(out["t2i_r1"] - 100 * 2 / 3) < 1e-4
    out = recall_from_embeddings(img, txt, owner, torch.tensor([0, 1, 1]), ks=(1,))  # 1 and 2 same class
    assert out["t2i_r1"] == 100.0
