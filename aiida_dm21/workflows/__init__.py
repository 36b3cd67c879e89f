"""AiiDA workflows of aiida-dm21: ``dm21.scf`` (SCF with restarts), ``dm21.reference_data``, ``dm21.pipeline``."""
