"""Shared prompt prefixes for harc's decoder: which rows' prefixes to prefill once and copy."""

from __future__ import annotations


def prefix_groups(seqs: list[list[int]], min_len: int = 32, overhead: int = 64
                  ) -> tuple[list[int], list[int], list[list[int]]]:
    """Shared token prefixes worth computing once: (group per row or -1, prefix length per row,
    prefix tokens per group).

    Sorted lexicographically, rows sharing a prefix are contiguous and the longest prefix shared by
    a run is the minimum adjacent common-prefix length. A run either uses one prefix or splits at
    its minima into runs with longer prefixes; the cheaper in prefilled tokens wins (a prefix pass
    counts `overhead` extra tokens). Each prefix leaves at least one token per row to prefill.
    """
    n = len(seqs)
    order = sorted(range(n), key=lambda i: seqs[i])

    def lcp(a: list[int], b: list[int]) -> int:
        m = min(len(a), len(b))
        i = 0
        while i < m and a[i] == b[i]:
            i += 1
        return i

    adj = [lcp(seqs[order[k]], seqs[order[k + 1]]) for k in range(n - 1)]
    chosen: list[tuple[int, int, int]] = []  # (start, end inclusive, prefix length) in `order`

    def best(a: int, b: int, depth: int) -> tuple[int, list]:
        total = sum(len(seqs[order[k]]) for k in range(a, b + 1))
        if a == b:
            return total, []
        low = min(adj[a:b])
        m = min(low, min(len(seqs[order[k]]) for k in range(a, b + 1)) - 1)
        one = (total - (b - a) * m + overhead, [(a, b, m)]) if m >= min_len else (total, [])
        if depth > 64:
            return one
        cost, plan, start = 0, [], a
        for k in range(a, b + 1):
            if k == b or adj[k] == low:
                c, p = best(start, k, depth + 1)
                cost, plan, start = cost + c, plan + p, k + 1
        return min(one, (cost, plan), key=lambda x: x[0])

    if n > 1:
        chosen = best(0, n - 1, 0)[1]
    group, plen, tokens = [-1] * n, [0] * n, []
    for a, b, m in chosen:
        for k in range(a, b + 1):
            group[order[k]], plen[order[k]] = len(tokens), m
        tokens.append(seqs[order[a]][:m])
    return group, plen, tokens
