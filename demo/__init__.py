"""The bundled demo site that ``tb up`` serves, so a fresh install has an authorised target."""
