"""Slow, loop-based references written straight from each paper's formula (test oracles only)."""

from __future__ import annotations

import torch
from torch import Tensor


def _unit(v: Tensor) -> Tensor:
    return v / torch.sqrt((v * v).sum())


def softtriple_reference(x: Tensor, labels: Tensor, centers: Tensor, la: float, gamma: float,
                         tau: float, margin: float) -> Tensor:
    """SoftTriple per DESIGN.md section 1, one example, class and center at a time."""
    num_classes, k, _ = centers.shape
    w = [[_unit(centers[c, j]) for j in range(k)] for c in range(num_classes)]
    total = x.new_zeros(())
    for i in range(x.shape[0]):
        xi = _unit(x[i])
        logits = []
        for c in range(num_classes):
            s = [torch.dot(xi, w[c][j]) for j in range(k)]
            if gamma == 0:
                big = s[0]
                for v in s[1:]:
                    big = torch.maximum(big, v)
                sim = big
            else:
                top = max(float(v.detach()) for v in s)
                e = [torch.exp((v - top) / gamma) for v in s]
                z = sum(e)
                sim = sum(e[j] / z * s[j] for j in range(k))
            logits.append(la * (sim - (margin if c == int(labels[i]) else 0.0)))
        top = max(float(v.detach()) for v in logits)
        log_z = top + torch.log(sum(torch.exp(v - top) for v in logits))
        total = total + (log_z - logits[int(labels[i])])
    loss = total / x.shape[0]
    if tau > 0 and k > 1:
        reg = x.new_zeros(())
        for c in range(num_classes):
            for t in range(k):
                for s_ in range(t + 1, k):
                    reg = reg + torch.sqrt(2.0 + 1e-5 - 2.0 * torch.dot(w[c][t], w[c][s_]))
        loss = loss + tau * reg / (num_classes * k * (k - 1))
    return loss


def softmax_norm_reference(x: Tensor, labels: Tensor, centers: Tensor, la: float,
                           margin: float) -> Tensor:
    """Normalized SoftMax with margin: one center per class; centers (C, d)."""
    return softtriple_reference(x, labels, centers[:, None, :], la, 1.0, 0.0, margin)


def log_sum_exp(values: list[Tensor]) -> Tensor:
    top = max(float(v.detach()) for v in values)
    return top + torch.log(sum(torch.exp(v - top) for v in values))



def _dist(a: Tensor, b: Tensor) -> Tensor:
    return torch.sqrt(((a - b) ** 2).sum())


def proxy_nca_reference(x: Tensor, labels: Tensor, proxies: Tensor, scale: float,
                        exclude_positive: bool) -> Tensor:
    """Movshovitz-Attias et al. eq. 9 with squared distances of unit vectors."""
    total = x.new_zeros(())
    for i in range(len(x)):
        xi = _unit(x[i])
        d = [scale * ((xi - _unit(proxies[z])) ** 2).sum() for z in range(len(proxies))]
        y = int(labels[i])
        others = [-d[z] for z in range(len(d)) if z != y or not exclude_positive]
        total = total + d[y] + log_sum_exp(others)
    return total / len(x)


def npair_reference(x: Tensor, labels: Tensor, l2_reg: float) -> Tensor:
    """Sohn eq. 6 with each class's first two occurrences as the pair."""
    pairs: dict[int, list[int]] = {}
    for i, label in enumerate(labels.tolist()):
        pairs.setdefault(label, [])
        if len(pairs[label]) < 2:
            pairs[label].append(i)
    full = [v for v in pairs.values() if len(v) == 2]
    total = x.new_zeros(())
    for a, p in full:
        inner = 1.0 + sum(torch.exp(torch.dot(x[a], x[q]) - torch.dot(x[a], x[p]))
                          for b, q in full if b != a)
        total = total + torch.log(inner)
    loss = total / len(full)
    reg = sum(torch.dot(x[a], x[a]) + torch.dot(x[p], x[p]) for a, p in full) / len(full)
    return loss + 0.25 * l2_reg * reg


def lifted_reference(x: Tensor, labels: Tensor, margin: float) -> Tensor:
    """Song et al. 2016 eq. 4."""
    n = len(x)
    y = labels.tolist()
    total, count = x.new_zeros(()), 0
    for i in range(n):
        for j in range(i + 1, n):
            if y[i] != y[j]:
                continue
            terms = [margin - _dist(x[i], x[k]) for k in range(n) if y[k] != y[i]]
            terms += [margin - _dist(x[j], x[k]) for k in range(n) if y[k] != y[j]]
            jij = log_sum_exp(terms) + _dist(x[i], x[j])
            total = total + torch.clamp(jij, min=0) ** 2
            count += 1
    return total / (2 * count)


def triplet_semihard_reference(x: Tensor, labels: Tensor, margin: float,
                               hardest: bool = False) -> Tensor:
    """FaceNet eq. 1 on unit vectors, squared distances, one semi-hard negative per (a, p) (with
    ``hardest``, the closest negative instead)."""
    u = [_unit(v) for v in x]
    y = labels.tolist()
    losses = []
    for a in range(len(x)):
        for p in range(len(x)):
            if a == p or y[a] != y[p]:
                continue
            d_ap = ((u[a] - u[p]) ** 2).sum()
            negs = [((u[a] - u[k]) ** 2).sum() for k in range(len(x)) if y[k] != y[a]]
            farther = [d for d in negs if float(d) > float(d_ap)]
            d_an = min(farther, key=float) if farther else max(negs, key=float)
            if hardest:
                d_an = min(negs, key=float)
            losses.append(torch.clamp(d_ap - d_an + margin, min=0))
    return sum(losses) / len(losses)


def nmi_reference(a: list[int], b: list[int]) -> float:
    n = len(a)
    import math
    pa = {v: a.count(v) / n for v in set(a)}
    pb = {v: b.count(v) / n for v in set(b)}
    mi = 0.0
    for u in pa:
        for v in pb:
            joint = sum(1 for s, t in zip(a, b, strict=True) if s == u and t == v) / n
            if joint > 0:
                mi += joint * math.log(joint / (pa[u] * pb[v]))
    h = [-sum(p * math.log(p) for p in d.values()) for d in (pa, pb)]
    if h[0] == 0 and h[1] == 0:
        return 1.0
    return mi / ((h[0] + h[1]) / 2)


def clustering_objective_reference(x: Tensor, labels: Tensor, medoids: list[int],
                                   gamma: float) -> Tensor:
    """F(X, S) + gamma (1 - NMI(g(S), y)) of Song et al. 2017 with unit vectors."""
    u = [_unit(v) for v in x]
    f = x.new_zeros(())
    assign = []
    for i in range(len(x)):
        d = [_dist(u[i], u[j]) for j in medoids]
        best = min(range(len(d)), key=lambda m: float(d[m]))
        f = f - d[best]
        assign.append(medoids[best])
    return f + gamma * (1.0 - nmi_reference(labels.tolist(), assign))


def clustering_oracle_reference(x: Tensor, labels: Tensor) -> Tensor:
    u = [_unit(v) for v in x]
    y = labels.tolist()
    total = x.new_zeros(())
    for k in set(y):
        members = [i for i in range(len(x)) if y[i] == k]
        scores = [-sum(_dist(u[i], u[j]) for i in members) for j in members]
        total = total + max(scores, key=float)
    return total


def proxy_anchor_reference(x: Tensor, labels: Tensor, proxies: Tensor, alpha: float,
                           margin: float) -> Tensor:
    """Kim et al. 2020 eq. 4, one proxy and one embedding at a time."""
    xs = [_unit(x[i]) for i in range(len(x))]
    positive_proxies = sorted({int(y) for y in labels})
    pos = x.new_zeros(())
    neg = x.new_zeros(())
    for c in range(len(proxies)):
        p = _unit(proxies[c])
        pos_sum, neg_sum = x.new_zeros(()), x.new_zeros(())
        for i, xi in enumerate(xs):
            s = (xi * p).sum()
            if int(labels[i]) == c:
                pos_sum = pos_sum + torch.exp(-alpha * (s - margin))
            else:
                neg_sum = neg_sum + torch.exp(alpha * (s + margin))
        if c in positive_proxies:
            pos = pos + torch.log(1 + pos_sum)
        neg = neg + torch.log(1 + neg_sum)
    return pos / len(positive_proxies) + neg / len(proxies)


def _cos(a: Tensor, b: Tensor) -> Tensor:
    return torch.dot(_unit(a), _unit(b))


def contrastive_reference(x: Tensor, labels: Tensor, pos_margin: float,
                          neg_margin: float) -> Tensor:
    """Every ordered pair i != j; each of the two means over the pairs with a positive loss."""
    pos, neg = [], []
    for i in range(len(x)):
        for j in range(len(x)):
            if i == j:
                continue
            d = torch.sqrt(((_unit(x[i]) - _unit(x[j])) ** 2).sum())
            if labels[i] == labels[j]:
                pos.append(torch.relu(d - pos_margin))
            else:
                neg.append(torch.relu(neg_margin - d))
    total = x.new_zeros(())
    for terms in (pos, neg):
        active = [t for t in terms if float(t) > 0]
        if active:
            total = total + sum(active) / len(active)
    return total


def multi_similarity_reference(x: Tensor, labels: Tensor, alpha: float, beta: float,
                               base: float, epsilon: float | None) -> Tensor:
    """Paper eq. 6 anchor by anchor, with its pair mining (eq. 3, 4) when epsilon is set."""
    n = len(x)
    total = x.new_zeros(())
    for i in range(n):
        sims = {j: _cos(x[i], x[j]) for j in range(n) if j != i}
        pos = [j for j in sims if labels[j] == labels[i]]
        neg = [j for j in sims if labels[j] != labels[i]]
        if epsilon is not None:
            max_neg = max((float(sims[j]) for j in neg), default=float("-inf"))
            min_pos = min((float(sims[j]) for j in pos), default=float("inf"))
            pos = [j for j in pos if float(sims[j]) - epsilon < max_neg]
            neg = [j for j in neg if float(sims[j]) + epsilon > min_pos]
        pos_sum = sum((torch.exp(-alpha * (sims[j] - base)) for j in pos), x.new_zeros(()))
        neg_sum = sum((torch.exp(beta * (sims[j] - base)) for j in neg), x.new_zeros(()))
        total = total + torch.log1p(pos_sum) / alpha + torch.log1p(neg_sum) / beta
    return total / n


def margin_softmax_reference(x: Tensor, labels: Tensor, weights: Tensor, scale: float,
                             margin: float, kind: str, centers_per_class: int = 1) -> Tensor:
    """CosFace (cos - m) or ArcFace (cos(theta + m), margin in degrees, cos(theta) - m sin(m)
    past theta = pi - m) on the target class, cross-entropy of scale x logits; a class's cosine
    is the largest of its K sub-centers' (weights' rows c K .. c K + K - 1; Sub-center ArcFace)."""
    import math

    total = x.new_zeros(())
    k = centers_per_class
    for i in range(len(x)):
        logits = []
        for c in range(len(weights) // k):
            cos = _cos(x[i], weights[c * k])
            for j in range(1, k):
                other = _cos(x[i], weights[c * k + j])
                cos = other if float(other) > float(cos) else cos
            if c == int(labels[i]):
                if kind == "cosface":
                    cos = cos - margin
                else:
                    m = math.radians(margin)
                    theta = torch.acos(cos.clamp(-1, 1))
                    cos = (torch.cos(theta + m) if float(theta) <= math.pi - m
                           else cos - m * math.sin(m))
            logits.append(scale * cos)
        top = max(float(v.detach()) for v in logits)
        log_z = top + torch.log(sum(torch.exp(v - top) for v in logits))
        total = total + log_z - logits[int(labels[i])]
    return total / len(x)


def center_regularizer(centers: Tensor) -> Tensor:
    """The simple composition of SoftTriple's regularizer (the fused one is
    ``softtriple.losses._fused.center_regularizer_fused``):

    R = sum_c sum_{t<s} sqrt(2 + 1e-5 - 2 w_c^t . w_c^s) / (C K (K - 1)), per class block.

    Args:
        centers: (C, K, d) L2-normalized centers, K >= 2.

    Returns:
        A scalar; memory O(C K^2), never a CK x CK matrix.
    """
    num_classes, k, _ = centers.shape
    gram = centers @ centers.transpose(1, 2)  # (C, K, K)
    t, s = torch.triu_indices(k, k, offset=1, device=centers.device)
    dist = torch.sqrt((2.0 + 1e-5 - 2.0 * gram[:, t, s]).clamp_min(1e-12))  # (C, K(K-1)/2)
    return dist.sum() / (num_classes * k * (k - 1))
