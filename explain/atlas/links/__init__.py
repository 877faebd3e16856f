"""Links between concepts: the nearest concepts of other classes (:mod:`.nearest`) and the comparison of two
atlases of the same classes (:mod:`.compare`)."""
