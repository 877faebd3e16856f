"""Concept atlas (Lens, generalised): the concepts a model uses for each class over a whole data set, as a static site."""
