"""Projections of the stock table: Redis and the search index (see base.Projection)."""
