"""The one table: a user's date of birth, keyed by the NFC username."""

from __future__ import annotations

from datetime import date, datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from app.domain import USERNAME_MAX_LENGTH


class User(SQLModel, table=True):
    __tablename__ = "users"

    username: str = Field(
        sa_column=sa.Column(sa.String(USERNAME_MAX_LENGTH), primary_key=True)
    )
    date_of_birth: date = Field(sa_column=sa.Column(sa.Date(), nullable=False))
    created_at: datetime = Field(
        sa_column=sa.Column(
            sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        )
    )
    updated_at: datetime = Field(
        sa_column=sa.Column(
            sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        )
    )


users = SQLModel.metadata.tables["users"]
