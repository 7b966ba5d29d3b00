"""fedsynth's web app: the coordinator's dashboard (`fedsynth dashboard`) and the readers'
side of a blinded reader study (`fedsynth reader-study serve`). Both read what is on disk
(run folders, study files); neither keeps a copy of results."""
