//! `replica list`: the control-plane replicas the server hears.

use crate::cli::{self, Context, ReplicaCommand};
use crate::error::ClientError;
use crate::exit;
use crate::output;

pub async fn run(ctx: &Context, command: ReplicaCommand) -> Result<i32, ClientError> {
    match command {
        ReplicaCommand::List => {
            let replicas = ctx.client()?.replicas().await?;
            match output::structured(ctx.output, &replicas)? {
                Some(text) => cli::print(&text)?,
                None => cli::print(&output::replicas_table(&replicas))?,
            }
        }
    }
    Ok(exit::OK)
}
