"""Questions answered from the graph: retrieval of facts and the grounded answer."""
