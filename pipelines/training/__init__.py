"""One training-loop shape for every model (detector, Deep SAD, ResNeSt): `fit`."""
