# The storage root of aiplatform on S3: a private, versioned, encrypted bucket, and the
# least access the pods need (objects under one prefix), granted to the pods' Kubernetes
# ServiceAccount through IRSA (or to an IAM user on a cluster without it).

locals {
  oidc_issuer = var.oidc_provider_arn == "" ? "" : element(split("oidc-provider/", var.oidc_provider_arn), 1)
}

resource "aws_s3_bucket" "root" {
  bucket = var.bucket_name
  tags   = var.tags
}

resource "aws_s3_bucket_public_access_block" "root" {
  bucket                  = aws_s3_bucket.root.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "root" {
  bucket = aws_s3_bucket.root.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

# Versioning keeps the previous object when a file is replaced or deleted (a bad run can be
# undone); Lance tables keep their own versions on top.
resource "aws_s3_bucket_versioning" "root" {
  bucket = aws_s3_bucket.root.id
  versioning_configuration {
    status = "Enabled"
  }
}

# Encrypted at rest with S3-managed keys. For a customer-managed KMS key, set sse_algorithm =
# "aws:kms" and kms_master_key_id, and allow kms:Decrypt and kms:GenerateDataKey on that key
# in the access policy below.
resource "aws_s3_bucket_server_side_encryption_configuration" "root" {
  bucket = aws_s3_bucket.root.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "root" {
  bucket = aws_s3_bucket.root.id
  rule {
    id     = "expire-old-versions"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_days
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }
  depends_on = [aws_s3_bucket_versioning.root]
}

# TLS only.
data "aws_iam_policy_document" "bucket" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.root.arn, "${aws_s3_bucket.root.arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "root" {
  bucket     = aws_s3_bucket.root.id
  policy     = data.aws_iam_policy_document.bucket.json
  depends_on = [aws_s3_bucket_public_access_block.root]
}

# What the pods may do: list the prefix, read and write (conditional PUT for Lance commits,
# multipart uploads for large files) and delete objects under it. Nothing else in the bucket.
data "aws_iam_policy_document" "access" {
  statement {
    sid       = "ListThePrefix"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.root.arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = [var.prefix, "${var.prefix}/*"]
    }
  }
  statement {
    sid       = "BucketLocation"
    actions   = ["s3:GetBucketLocation"]
    resources = [aws_s3_bucket.root.arn]
  }
  statement {
    sid = "ObjectsUnderThePrefix"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = ["${aws_s3_bucket.root.arn}/${var.prefix}/*"]
  }
}

resource "aws_iam_policy" "access" {
  name        = "${var.bucket_name}-access"
  description = "aiplatform: read/write s3://${var.bucket_name}/${var.prefix}/"
  policy      = data.aws_iam_policy_document.access.json
  tags        = var.tags
}

# IRSA: the pods' ServiceAccount (annotated with this role's ARN in the overlay) assumes it.
data "aws_iam_policy_document" "assume" {
  count = var.oidc_provider_arn == "" ? 0 : 1
  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [var.oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:aud"
      values   = ["sts.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:sub"
      values   = [for sa in var.service_accounts : "system:serviceaccount:${replace(sa, "/", ":")}"]
    }
  }
}

resource "aws_iam_role" "pods" {
  count              = var.oidc_provider_arn == "" ? 0 : 1
  name               = "${var.bucket_name}-pods"
  assume_role_policy = data.aws_iam_policy_document.assume[0].json
  tags               = var.tags
}

resource "aws_iam_role_policy_attachment" "pods" {
  count      = var.oidc_provider_arn == "" ? 0 : 1
  role       = aws_iam_role.pods[0].name
  policy_arn = aws_iam_policy.access.arn
}

# Without IRSA: an IAM user with the same policy. Its access key is created outside Terraform
# (aws iam create-access-key) so that no secret lands in the Terraform state.
resource "aws_iam_user" "pods" {
  count = var.create_iam_user ? 1 : 0
  name  = "${var.bucket_name}-pods"
  tags  = var.tags
}

resource "aws_iam_user_policy_attachment" "pods" {
  count      = var.create_iam_user ? 1 : 0
  user       = aws_iam_user.pods[0].name
  policy_arn = aws_iam_policy.access.arn
}
