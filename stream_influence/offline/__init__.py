"""Offline tools: the influence audit of a whole data set, replay, bundled data sets, plots."""
