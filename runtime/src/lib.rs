//! nodelet's embedded OCI runtime: pod sandboxes (namespaces kept as bind-mounted files, no pause process) and
//! containers on youki's `libcontainer`, driven in-process. See `../shared/DESIGN.md` and issue "runtime/".
