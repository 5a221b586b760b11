"""The embedded default model `wan-tiny-shapes`: its synthetic task (`shapes`), its training recipe (`train`)
and its shipped checkpoint (`wan-tiny-shapes/`, original Wan release layout)."""
