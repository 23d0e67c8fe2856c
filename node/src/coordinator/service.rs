//! The coordinator's front doors: the gRPC control plane (join, report, status, leave) and the
//! QUIC data plane's accept loop. Both only turn what arrives into `Cmd`s for the actor.

use super::{Cmd, Reply};
use crate::parts::receive_parts;
use crate::same_secret;
use anyhow::{anyhow, Result};
use atoll_coordinator::LearnerId;
use atoll_link::Hello;
use atoll_proto::v1::coordinator_server::Coordinator;
use atoll_proto::v1::*;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

pub(super) async fn accept_data(endpoint: quinn::Endpoint, tx: mpsc::Sender<Cmd>, max_frame: u64) {
    while let Some(incoming) = endpoint.accept().await {
        let tx = tx.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!("data connection failed: {e}");
                    return;
                }
            };
            let learner = match hello(&conn, &tx).await {
                Ok(id) => id,
                Err(e) => {
                    let _ = tx
                        .send(Cmd::BadData {
                            learner: None,
                            reason: format!("{e:#}"),
                        })
                        .await;
                    conn.close(1u32.into(), b"refused");
                    return;
                }
            };
            let mut parts = receive_parts(conn.clone(), max_frame, true);
            while let Some(part) = parts.recv().await {
                match part {
                    Ok(part) => {
                        let _ = tx.send(Cmd::Part { learner, part }).await;
                    }
                    Err(e) => {
                        let _ = tx
                            .send(Cmd::BadData {
                                learner: Some(learner),
                                reason: format!("{e:#}"),
                            })
                            .await;
                        conn.close(2u32.into(), b"bad frame");
                        return;
                    }
                }
            }
        });
    }
}

async fn hello(conn: &quinn::Connection, tx: &mpsc::Sender<Cmd>) -> Result<LearnerId> {
    let (mut send, mut recv) = tokio::time::timeout(Duration::from_secs(10), conn.accept_bi())
        .await
        .map_err(|_| anyhow!("no hello within 10 s"))??;
    let bytes = recv
        .read_to_end(Hello::MAX_LEN)
        .await
        .map_err(|e| anyhow!("bad hello: {e}"))?;
    let hello = Hello::decode(&bytes)?;
    let (reply, answer) = oneshot::channel();
    tx.send(Cmd::Connected {
        session: hello.session,
        conn: conn.clone(),
        reply,
    })
    .await
    .map_err(|_| anyhow!("coordinator stopping"))?;
    match answer.await? {
        Some(id) => {
            send.write_all(&[0]).await?;
            send.finish()?;
            Ok(id)
        }
        None => {
            send.write_all(b"\x01unknown session").await?;
            send.finish()?;
            Err(anyhow!("data connection with an unknown session"))
        }
    }
}

pub(super) struct Service {
    pub(super) tx: mpsc::Sender<Cmd>,
    pub(super) secret: Arc<String>,
}

impl Service {
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<Response<T>, Status> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| Status::unavailable("coordinator stopping"))?;
        answer
            .await
            .map_err(|_| Status::unavailable("coordinator stopping"))?
            .map(Response::new)
    }
}

#[tonic::async_trait]
impl Coordinator for Service {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        let req = request.into_inner();
        if !same_secret(&req.secret, &self.secret) {
            metrics::counter!("atoll_refused_joins_total", "reason" => "secret").increment(1);
            tracing::warn!(
                "refused a join from region {:?}: wrong job secret",
                req.region
            );
            return Err(Status::permission_denied("wrong job secret"));
        }
        self.ask(|r| Cmd::Join(req, r)).await
    }

    async fn report(
        &self,
        request: Request<ReportRequest>,
    ) -> Result<Response<ReportReply>, Status> {
        self.ask(|r| Cmd::Report(request.into_inner(), r)).await
    }

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        if !same_secret(&request.get_ref().secret, &self.secret) {
            return Err(Status::permission_denied("wrong job secret"));
        }
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Cmd::Status(reply))
            .await
            .map_err(|_| Status::unavailable("coordinator stopping"))?;
        answer
            .await
            .map(Response::new)
            .map_err(|_| Status::unavailable("coordinator stopping"))
    }

    async fn leave(&self, request: Request<LeaveRequest>) -> Result<Response<LeaveReply>, Status> {
        let _ = self.tx.send(Cmd::Leave(request.into_inner().session)).await;
        Ok(Response::new(LeaveReply {}))
    }
}
