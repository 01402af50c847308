//! strata's containerd snapshotter (proxy plugin): containerd's `Snapshots` gRPC API.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod api {
    pub mod containerd {
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
        pub mod services {
            pub mod snapshots {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
            pub mod content {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.content.v1");
                }
            }
            pub mod images {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.images.v1");
                }
            }
            pub mod leases {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.leases.v1");
                }
            }
            pub mod diff {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.diff.v1");
                }
            }
        }
    }
}

pub mod client;
pub mod cri;
pub mod meta;
pub mod remote;
pub mod server;
