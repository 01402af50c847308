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
        }
    }
}

pub mod meta;
pub mod server;
