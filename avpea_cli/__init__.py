"""`avpea-ray`: the one command line over the library (`avpea_ray`) and its dataset tools
(`sharding`). It sits above both, as `jobs/` does; neither imports it."""
