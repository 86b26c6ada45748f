"""Device-only stand-in for faiss (its 19 MB wheel did not fit the transfer): exact inner-product search in numpy.

Carried as ``.dev/shim/faiss.py`` and put first on PYTHONPATH by cuda_check.sh; never imported by the bundle.
"""

import numpy as np

METRIC_INNER_PRODUCT = 0


class IndexFlatIP:
    """faiss.IndexFlatIP's add/search/ntotal; empty result slots hold id -1 and -3.4e38, as faiss fills them."""

    def __init__(self, d):
        self.d, self.x = d, np.zeros((0, d), np.float32)

    @property
    def ntotal(self):
        return len(self.x)

    def add(self, x):
        self.x = np.concatenate([self.x, np.asarray(x, np.float32)])

    def search(self, q, k):
        sims = np.asarray(q, np.float32) @ self.x.T
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        out_s = np.full((len(q), k), -3.4e38, np.float32)
        out_i = np.full((len(q), k), -1, np.int64)
        m = order.shape[1]
        out_i[:, :m] = order
        out_s[:, :m] = np.take_along_axis(sims, order, 1)
        return out_s, out_i


Index = IndexFlatIP
