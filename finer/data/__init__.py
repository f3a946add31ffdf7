"""Building datasets: sources → concepts with coarse labels, Wikipedia knowledge and attributes → image rows,
grounding of attributes per image, and export in the original FINER formats."""
